"""Image references as Docker writes them: `[registry/]repository[:tag][@digest]`."""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")


@dataclass(frozen=True)
class ImageRef:
    registry: str
    """host[:port] of the registry; empty when the reference names none (Docker Hub)."""
    repository: str
    tag: str | None
    digest: str | None

    @property
    def is_tag_reference(self) -> bool:
        """A tag without a pinned digest: what it points at can change, so it can be watched."""
        return self.tag is not None and self.digest is None


def parse_image_ref(ref: str) -> ImageRef:
    """Splits a reference; raises ValueError saying which part is malformed."""
    name, _, digest = ref.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ValueError(f"image ref '{ref}': digest '{digest}' is not <algorithm>:<hex>")
    registry, slash, path = name.partition("/")
    # Docker's rule: the first component is a registry host when it looks like one.
    if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
        registry, path = "", name
    repository, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ValueError(f"image ref '{ref}': tag '{tag}' is not a valid tag")
    if not _REPOSITORY.match(repository):
        raise ValueError(f"image ref '{ref}': repository '{repository}' is not a valid name")
    return ImageRef(registry, repository, tag, digest or None)
