"""Values at dotted paths (`status.conditions.0.type`) in decoded JSON: one reader for the
stages (submit-and-poll pipelines, UI smoke) and the providers (Kubernetes objects, SageMaker
responses)."""

from __future__ import annotations

from typing import Any

MISSING = object()  # a default that tells a missing value from any value
_RAISE = object()


def dig(data: Any, path: str, default: Any = _RAISE) -> Any:
    """The value at a dotted path (`a.b.0.c`) inside decoded JSON, else `default`; without a
    default, KeyError names the path."""
    node = data
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif default is not _RAISE:
            return default
        else:
            raise KeyError(f"'{path}' not found in the response (stopped at '{part}')")
    return node
