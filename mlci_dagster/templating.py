"""`${a.b.c}` references in registry strings, resolved against what earlier stages produced.

Roots: `port` (the service's own port), `services.<name>.{port,url,host}`, `vars.<NAME>` (engine
variables), `env.<NAME>` (the environment: where secrets come from), `sandbox.{id,workdir}`,
`image.{digest,ref}`, `outputs.<pipeline>.<key>`, `config`, `engine`, `id` (a submitted job's id).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
ROOTS = {"port", "services", "vars", "env", "sandbox", "image", "outputs", "config", "engine", "id"}


class TemplateError(ValueError):
    """A reference that cannot be resolved: names the reference and what was available."""


def iter_references(value: Any) -> Iterator[str]:
    """Every `${...}` reference inside a nested structure of strings, lists and dicts."""
    if isinstance(value, str):
        yield from REFERENCE.findall(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from iter_references(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_references(item)


def unset_env_references(value: Any) -> list[str]:
    """The `${env.NAME}` references in `value` whose variable is not set (a template error
    would list every variable that is)."""
    names = [ref.partition(".")[2] for ref in iter_references(value) if ref.startswith("env.")]
    return [name for name in names if name not in os.environ]


def _lookup(context: Mapping[str, Any], reference: str) -> Any:
    node: Any = context
    for part in reference.split("."):
        if not isinstance(node, Mapping) or part not in node:
            available = sorted(node) if isinstance(node, Mapping) else []
            raise TemplateError(
                f"${{{reference}}}: no '{part}' here (available: {', '.join(available) or 'none'})"
            )
        node = node[part]
    return node


def render(value: Any, context: Mapping[str, Any], keep: frozenset[str] = frozenset()) -> Any:
    """Replaces every reference in strings inside `value`; other values pass through.

    References whose root is in `keep` stay as written: `env` is kept until a process starts,
    so secrets never sit in a handle, a stored output or metadata.
    """

    def substitute(match: re.Match[str]) -> str:
        reference = match.group(1)
        if reference.split(".", 1)[0] in keep:
            return match.group(0)
        return str(_lookup(context, reference))

    if isinstance(value, str):
        return REFERENCE.sub(substitute, value)
    if isinstance(value, Mapping):
        return {k: render(v, context, keep) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, context, keep) for v in value]
    return value
