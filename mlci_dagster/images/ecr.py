"""Amazon ECR through boto3: the digest an image tag points at, and a repository's tags.

Credentials come from boto3's standard chain (AWS_* environment variables, a profile, an
instance role), never from the registry YAML.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mlci_dagster.images.errors import ImageRegistryError

ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$")
# Fail fast: a sensor tick or an image stage should not wait minutes for an unreachable API.
CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=15,
                       retries={"max_attempts": 2, "mode": "standard"})


class EcrRegistry:
    """One ECR registry, named by its host `<account>.dkr.ecr.<region>.amazonaws.com`."""

    def __init__(self, host: str, *, region: str | None = None, endpoint_url: str | None = None,
                 client: Any = None) -> None:
        match = ECR_HOST.match(host)
        self.host = host
        self.region = region or (match["region"] if match else None)
        if not self.region:
            raise ImageRegistryError(f"ecr registry {host}: no region given and none in the host")
        self._registry_id = {"registryId": match["account"]} if match else {}
        self._client = client or boto3.client("ecr", region_name=self.region,
                                              endpoint_url=endpoint_url, config=CLIENT_CONFIG)

    def tags(self, repo: str) -> list[str]:
        """Every tag in `repo`."""
        tags: list[str] = []
        with self._errors(repo):
            pages = self._client.get_paginator("list_images").paginate(
                repositoryName=repo, filter={"tagStatus": "TAGGED"}, **self._registry_id)
            for page in pages:
                tags.extend(i["imageTag"] for i in page["imageIds"] if "imageTag" in i)
        return tags

    def digest(self, repo: str, tag: str) -> str:
        """The digest of the image `repo:tag` points at now."""
        with self._errors(f"{repo}:{tag}"):
            details = self._client.describe_images(
                repositoryName=repo, imageIds=[{"imageTag": tag}], **self._registry_id
            )["imageDetails"]
        if not details:
            raise ImageRegistryError(f"{self._where(f'{repo}:{tag}')}: no such image")
        return details[0]["imageDigest"]

    def _where(self, image: str) -> str:
        return f"ecr registry {self.host} ({self.region}): {image}"

    @contextlib.contextmanager
    def _errors(self, image: str) -> Iterator[None]:
        """boto3's errors as ImageRegistryError, with the registry and the image in front."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise ImageRegistryError(f"{self._where(image)}: {error.get('Code')} "
                                     f"(HTTP {status}): {error.get('Message')}") from exc
        except BotoCoreError as exc:
            raise ImageRegistryError(f"{self._where(image)}: unreachable or not configured "
                                     f"({type(exc).__name__}: {exc})") from exc
