"""Dagster assets: the lifecycle multi-asset over config × engine, history and the grid."""
