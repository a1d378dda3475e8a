"""The artifact store: a local directory under $DAGSTER_HOME by default, an S3 bucket and prefix
(boto3, the standard credential chain, another endpoint allowed) when scaled out. Small enough
for another object store: write one object under a key, whole or not at all; say where a reader
finds it; list and delete under a prefix.

An artifact larger than the limit is stored truncated, with a note saying so at its end, never
dropped. A store that cannot be reached or refuses raises StoreError, in bounded time.

Links: under `public_url` when one is configured (a web server or CDN in front of the store),
else an S3 object's presigned GET URL, valid for `link_lifetime_h`, else a local file's
file:// URL (which works on this machine only).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import mimetypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from mlci_dagster.common.aws import AwsError, AwsSettings, aws_client, call_aws
from mlci_dagster.registry.models import ArtifactSettings

ARTIFACTS_DIR = "artifacts"  # under $DAGSTER_HOME/mlci
UPLOAD_TIMEOUT_S = 20.0
TEXT = "text/plain; charset=utf-8"
# What a browser should do with each file: show logs and reports, render pages.
CONTENT_TYPES = {".log": TEXT, ".txt": TEXT, ".out": TEXT, ".err": TEXT, ".json": TEXT,
                 ".yaml": TEXT, ".xml": "application/xml", ".html": "text/html; charset=utf-8",
                 ".jpg": "image/jpeg", ".png": "image/png", ".gz": "application/gzip"}


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


@dataclass(frozen=True)
class StoredObject:
    """One object found in the store: its key, size and when it was last written."""

    key: str
    size: int
    modified: float  # epoch seconds


class ArtifactStore(Protocol):
    def write(self, key: str, body: bytes, truncated: bool = False) -> Stored: ...

    def link(self, key: str) -> str: ...

    def objects(self, prefix: str = "") -> Iterator[StoredObject]: ...

    def delete(self, keys: list[str]) -> None: ...

    def link_lifetime(self) -> int | None: ...

    def location(self) -> str: ...


def content_type(key: str) -> str:
    """What the object is, for a browser opening its link: text for logs and files without a
    known suffix, else by its suffix."""
    suffix = Path(key).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0] or TEXT


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


def put(store: ArtifactStore, key: str, source: Path, max_bytes: int) -> Stored:
    """Stores the file `source` under `key`, truncated past `max_bytes`."""
    body, truncated = bounded(source, max_bytes)
    return store.write(key, body, truncated)


def _stored(key: str, body: bytes, truncated: bool, url: str) -> Stored:
    return Stored(key, len(body), hashlib.sha256(body).hexdigest(), truncated, url)


def _public(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key}"


@dataclass(frozen=True)
class LocalStore:
    """A directory: each artifact written to a temporary name, then renamed into place."""

    root: Path
    public_url: str | None = None

    def write(self, key: str, body: bytes, truncated: bool = False) -> Stored:
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

    def link(self, key: str) -> str:
        return _public(self.public_url, key) if self.public_url else (self.root / key).as_uri()

    def link_lifetime(self) -> int | None:
        return None

    def location(self) -> str:
        return str(self.root)

    def objects(self, prefix: str = "") -> Iterator[StoredObject]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and path.is_file() and not path.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    stat = path.stat()
                    yield StoredObject(key, stat.st_size, stat.st_mtime)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                (self.root / key).unlink(missing_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.root / key}: not deleted: {exc.strerror or exc}"
                                 ) from None
        for key in keys:  # the run's directories left empty
            for parent in (self.root / key).parents:
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()


@dataclass(frozen=True)
class S3Store:
    """A bucket and a prefix; one PutObject per artifact, so an object exists whole or not."""

    bucket: str
    prefix: str
    aws: AwsSettings
    public_url: str | None = None
    link_lifetime_s: int = 7 * 24 * 3600

    @cached_property
    def _client(self) -> Any:
        """One client per store: a grid of links signs many."""
        return aws_client("s3", self.aws.resolve(), UPLOAD_TIMEOUT_S, max_attempts=2,
                          signature_version="s3v4")

    def write(self, key: str, body: bytes, truncated: bool = False) -> Stored:
        name = self.prefix + key
        try:
            call_aws(f"PutObject s3://{self.bucket}/{name}", self._client.put_object,
                     Bucket=self.bucket, Key=name, Body=body, ContentType=content_type(key),
                     ChecksumSHA256=_b64_sha256(body))
        except AwsError as exc:
            raise StoreError(str(exc)) from None
        return _stored(key, body, truncated, f"s3://{self.bucket}/{name}")

    def link(self, key: str) -> str:
        if self.public_url:
            return _public(self.public_url, key)
        # Signed here, with no call: it works for whoever holds it until it expires.
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=self.link_lifetime_s)

    def link_lifetime(self) -> int | None:
        """Seconds a link works; None when links are public URLs, which last."""
        return None if self.public_url else self.link_lifetime_s

    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def objects(self, prefix: str = "") -> Iterator[StoredObject]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"][len(self.prefix):], item["Size"],
                                       item["LastModified"].timestamp())
        except Exception as exc:  # noqa: BLE001 (botocore's, raised while paging)
            raise StoreError(f"ListObjectsV2 s3://{self.bucket}/{self.prefix}{prefix}: "
                             f"{exc}") from None

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 at most
            chunk = keys[start:start + 1000]
            try:
                answer = call_aws(f"DeleteObjects s3://{self.bucket}/{self.prefix}",
                                  self._client.delete_objects, Bucket=self.bucket,
                                  Delete={"Objects": [{"Key": self.prefix + k} for k in chunk],
                                          "Quiet": True})
            except AwsError as exc:
                raise StoreError(str(exc)) from None
            if errors := answer.get("Errors"):
                raise StoreError(f"DeleteObjects s3://{self.bucket}: {len(errors)} not deleted, "
                                 f"e.g. {errors[0].get('Key')}: {errors[0].get('Code')}")


def _b64_sha256(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def artifact_store(settings: ArtifactSettings, home: Path) -> ArtifactStore:
    """The store `settings` names: its S3 bucket, else the directory under `home` (the
    harness's home, $DAGSTER_HOME/mlci)."""
    if settings.s3 is not None:
        spec = settings.s3
        return S3Store(spec.bucket, spec.prefix, AwsSettings(spec.region, spec.endpoint_url),
                       settings.public_url, int(settings.link_lifetime_h * 3600))
    return LocalStore(home / ARTIFACTS_DIR, settings.public_url)


def linker(store: ArtifactStore) -> Callable[[str], str]:
    """`store.link`, or "" where no link can be made (no credentials to sign with): a view
    then shows the path on the machine instead."""

    def link(key: str) -> str:
        try:
            return store.link(key)
        except Exception:  # noqa: BLE001 (botocore's NoCredentialsError and the like)
            return ""

    return link
