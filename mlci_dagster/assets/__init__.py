"""Dagster assets: the six lifecycle stages over config × engine partitions."""
