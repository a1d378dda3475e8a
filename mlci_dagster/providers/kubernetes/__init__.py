"""The Kubernetes provider: a namespace per sandbox (see provider.py)."""

from mlci_dagster.providers.kubernetes.provider import KubernetesProvider

__all__ = ["KubernetesProvider"]
