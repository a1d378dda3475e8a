"""From red to culprit: bisection of a regression range (Dagster-free)."""
