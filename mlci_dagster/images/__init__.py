"""Container image registries, without Dagster: which digest an image tag points at now.

`OciRegistry` speaks the OCI distribution API (Docker Registry, Harbor, GHCR, Artifactory);
`EcrRegistry` asks Amazon ECR through boto3. Both answer `tags(repo)` and `digest(repo, tag)`.
"""

from mlci_dagster.images.clients import ImageRegistryClient, current_digest, registry_client
from mlci_dagster.images.ecr import EcrRegistry
from mlci_dagster.images.errors import ImageRegistryError
from mlci_dagster.images.oci import OciRegistry
from mlci_dagster.images.ref import ImageRef, parse_image_ref

# Run tags of a run started for one image digest; the image stage tests exactly that digest.

__all__ = [
    "IMAGE_DIGEST_TAG", "IMAGE_REF_TAG", "EcrRegistry", "ImageRef", "ImageRegistryClient",
    "ImageRegistryError", "OciRegistry", "current_digest", "parse_image_ref", "registry_client",
]
