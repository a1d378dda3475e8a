"""Manifest files of a Kubernetes sandbox: read (multi-document YAML, `List`s expanded), and
what a handle keeps of a created object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ManifestError(Exception):
    """A manifest file that cannot be read or rendered: names the file and the document."""


def load_manifest(path: Path) -> list[dict[str, Any]]:
    """The documents of a multi-document YAML file (a `List` expands to its items)."""
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from exc
    objects: list[dict[str, Any]] = []
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue
        if not isinstance(document, dict):
            raise ManifestError(f"{path}: document {index}: expected a mapping (an object), "
                                f"got {type(document).__name__}")
        if document.get("kind") == "List":
            objects += [item for item in document.get("items") or [] if item]
        else:
            objects.append(document)
    return objects


def object_ref(obj: dict[str, Any], namespaced: bool, source: str = "") -> dict[str, Any]:
    """What the handle keeps of a created object: enough to find it again, nothing more."""
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
            "name": (obj.get("metadata") or {}).get("name"), "namespaced": namespaced,
            "source": source}
