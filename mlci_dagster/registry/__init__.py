"""The registry of test configurations: YAML in, validated typed models out."""

from mlci_dagster.registry.loader import LoadedConfig, Registry, RegistryError, load_registry

__all__ = ["LoadedConfig", "Registry", "RegistryError", "load_registry"]
