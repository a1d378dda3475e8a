"""The artifact store: a local directory under $DAGSTER_HOME by default, an S3 bucket and prefix
(boto3, the standard credential chain, another endpoint allowed) when scaled out. Small enough
for another object store: `put` one file under a key, whole or not at all, and say what was
stored.

An artifact larger than the limit is stored truncated, with a note saying so at its end, never
dropped. A store that cannot be reached or refuses raises StoreError, in bounded time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlci_dagster.common.aws import AwsError, AwsSettings, aws_client, call_aws
from mlci_dagster.registry.models import ArtifactSettings

ARTIFACTS_DIR = "artifacts"  # under $DAGSTER_HOME/mlci
UPLOAD_TIMEOUT_S = 20.0


class StoreError(Exception):
    """An upload that did not happen: the store unreachable or refusing (`store`: the next
    upload would fare no better), or the file unreadable."""

    def __init__(self, message: str, store: bool = True) -> None:
        super().__init__(message)
        self.store = store


@dataclass(frozen=True)
class Stored:
    key: str
    size: int  # bytes stored (after any truncation)
    sha256: str  # of the bytes stored
    truncated: bool
    url: str  # where the store keeps it (file:// or s3://)


class ArtifactStore(Protocol):
    def put(self, key: str, source: Path, max_bytes: int) -> Stored: ...


def bounded(source: Path, max_bytes: int) -> tuple[bytes, bool]:
    """The file's bytes, or its first ones and a note when it is larger than `max_bytes`."""
    try:
        size = source.stat().st_size
        with open(source, "rb") as handle:
            if size <= max_bytes:
                return handle.read(), False
            note = (f"\n[mlci: truncated: the first {max_bytes:,} of {size:,} bytes; the whole "
                    f"file stays on the machine that ran it: {source}]\n").encode()
            return handle.read(max(0, max_bytes - len(note))) + note, True
    except OSError as exc:
        raise StoreError(f"{source}: not read: {exc.strerror or exc}", store=False) from None


def _stored(key: str, body: bytes, truncated: bool, url: str) -> Stored:
    return Stored(key, len(body), hashlib.sha256(body).hexdigest(), truncated, url)


@dataclass(frozen=True)
class LocalStore:
    """A directory: each artifact written to a temporary name, then renamed into place."""

    root: Path

    def put(self, key: str, source: Path, max_bytes: int) -> Stored:
        body, truncated = bounded(source, max_bytes)
        target = self.root / key
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(body)
            tmp.replace(target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreError(f"{target}: not written: {exc.strerror or exc}") from None
        return _stored(key, body, truncated, target.as_uri())


@dataclass(frozen=True)
class S3Store:
    """A bucket and a prefix; one PutObject per artifact, so an object exists whole or not."""

    bucket: str
    prefix: str
    aws: AwsSettings

    def put(self, key: str, source: Path, max_bytes: int) -> Stored:
        body, truncated = bounded(source, max_bytes)
        name = self.prefix + key
        try:
            client = aws_client("s3", self.aws.resolve(), UPLOAD_TIMEOUT_S, max_attempts=2)
            call_aws(f"PutObject s3://{self.bucket}/{name}", client.put_object,
                     Bucket=self.bucket, Key=name, Body=body,
                     ChecksumSHA256=_b64_sha256(body))
        except AwsError as exc:
            raise StoreError(str(exc)) from None
        return _stored(key, body, truncated, f"s3://{self.bucket}/{name}")


def _b64_sha256(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def artifact_store(settings: ArtifactSettings, home: Path) -> ArtifactStore:
    """The store `settings` names: its S3 bucket, else the directory under `home` (the
    harness's home, $DAGSTER_HOME/mlci)."""
    if settings.s3 is not None:
        spec = settings.s3
        return S3Store(spec.bucket, spec.prefix, AwsSettings(spec.region, spec.endpoint_url))
    return LocalStore(home / ARTIFACTS_DIR)
