"""mlci-dagster: end-to-end test lifecycles of ML platforms as a Dagster asset graph."""

__version__ = "0.1.0"
