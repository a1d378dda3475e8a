"""Dagster sensors: registry sync, image builds, the stale scanner, history updates, cleanup and
notifications."""
