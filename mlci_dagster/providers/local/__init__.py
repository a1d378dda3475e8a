"""The embedded default provider: services as local processes (see provider.py)."""

from mlci_dagster.providers.local.provider import SANDBOX_ID_ENV, LocalProvider, log_tail

__all__ = ["SANDBOX_ID_ENV", "LocalProvider", "log_tail"]
