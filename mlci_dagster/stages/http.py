"""HTTP helpers shared by the submit-and-poll pipeline and the UI smoke checks."""

from __future__ import annotations

from typing import Any

_MISSING = object()


def dig(data: Any, path: str, default: Any = _MISSING) -> Any:
    """The value at a dotted path (`a.b.0.c`) inside decoded JSON; KeyError names the path."""
    node = data
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif default is not _MISSING:
            return default
        else:
            raise KeyError(f"'{path}' not found in the response (stopped at '{part}')")
    return node
