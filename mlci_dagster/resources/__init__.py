"""Dagster resources: the thin layer's access to the registry and the sandbox provider."""
