"""The embedded default provider: services as local processes (see provider.py)."""

from mlci_dagster.providers.local.provider import LocalProvider, log_tail

__all__ = ["LocalProvider", "log_tail"]
