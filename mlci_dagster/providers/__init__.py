"""Sandbox providers: create, probe, run in, and destroy the sandboxes a lifecycle tests in."""
