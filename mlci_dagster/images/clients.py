"""The client for a declared registry, and the digest an image reference stands for now."""

from __future__ import annotations

import os
from typing import Protocol

from mlci_dagster.images.ecr import EcrRegistry
from mlci_dagster.images.errors import ImageRegistryError
from mlci_dagster.images.oci import OciRegistry
from mlci_dagster.images.ref import parse_image_ref
from mlci_dagster.registry.models import ImageRegistrySpec


class ImageRegistryClient(Protocol):
    def tags(self, repo: str) -> list[str]: ...

    def digest(self, repo: str, tag: str) -> str: ...


def registry_client(host: str, spec: ImageRegistrySpec) -> ImageRegistryClient:
    """A client for the registry at `host`; secrets come from the environment only."""
    if spec.kind == "ecr":
        return EcrRegistry(host, region=spec.region, endpoint_url=spec.endpoint_url)
    token = os.environ.get(spec.token_env) if spec.token_env else None
    if spec.token_env and not token:
        raise ImageRegistryError(f"oci registry {host}: environment variable {spec.token_env} "
                                 "(its token) is not set")
    return OciRegistry(host, insecure=spec.insecure, token=token)


def current_digest(ref: str, registries: dict[str, ImageRegistrySpec]) -> str:
    """The digest `ref` pins, or that its tag points at now in a declared registry; otherwise
    the reference as written. Raises ImageRegistryError when a declared registry cannot answer.
    """
    if "@" in ref:
        return ref.split("@", 1)[1]
    try:
        image = parse_image_ref(ref)
    except ValueError:
        return ref  # not a reference a registry could resolve: recorded as written
    if image.tag is None or image.registry not in registries:
        return ref
    client = registry_client(image.registry, registries[image.registry])
    return client.digest(image.repository, image.tag)
