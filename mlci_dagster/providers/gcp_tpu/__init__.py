"""The Cloud TPU VM provider: a TPU node per sandbox, SSH pipelines, always deleted."""

from mlci_dagster.providers.gcp_tpu.provider import TpuVmProvider

__all__ = ["TpuVmProvider"]
