"""Dagster sensors: keeping the config partitions equal to the registry."""
