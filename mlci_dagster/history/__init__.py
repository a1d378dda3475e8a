"""Dagster-free history: the consolidated results table and the analysis over it."""
