"""Dagster-free stage logic: each stage turns its inputs into a StageOutcome and never raises."""
