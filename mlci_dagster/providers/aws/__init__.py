"""The aws-sagemaker provider: a SageMaker endpoint per sandbox (see provider.py)."""

from mlci_dagster.providers.aws.provider import SageMakerProvider

__all__ = ["SageMakerProvider"]
