"""`${a.b.c}` references in registry strings, resolved against what earlier stages produced.

What each root provides is declared once, in PROVIDES: the registry loader rejects a reference
that can never resolve, and tests pin PROVIDES to the code that builds the context.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
# What the image stage's details hold (stages/image.py), per way of giving the image: an image
# given by `ref` has an empty `path`, one built on this machine an empty `ref`.
IMAGE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "image.ref": ("cached", "digest", "path", "ref"),
    "image.build.command": ("built_at", "cached", "digest", "path", "ref"),
    "image.build.codebuild": ("build_id", "built_at", "cached", "digest", "path", "ref"),
}
# Outputs a pipeline of a kind has whatever it declares: a submit_poll pipeline's job id
# (stages/pipelines.py), a sagemaker_invoke pipeline's latency (providers/aws/pipelines.py).
KIND_OUTPUTS: dict[str, tuple[str, ...]] = {"submit_poll": ("id",),
                                            "sagemaker_invoke": ("latency_ms",)}
# What each root provides at run time: providers/handle.py `render_context` builds config,
# engine, sandbox, services, vars and env; the stages add image and outputs; a local service's
# own definition has its port, a submit_poll pipeline's poll and logs URLs the job's id. A
# mapping lists the attributes, a `<placeholder>` stands for the names the registry declares
# (under env, any variable), None is a value.
PROVIDES: dict[str, Any] = {
    "config": None,  # the config's name
    "engine": None,
    "sandbox": {"id": None, "workdir": None},
    "services": {"<service>": {"port": None, "host": None, "url": None}},
    "vars": {"<engine variable>": None},
    "env": {"<variable>": None},
    "image": {"<attribute>": None},  # which ones: IMAGE_ATTRIBUTES
    "outputs": {"<pipeline>": {"<output>": None}},
    "port": None,
    "id": None,
}
ROOTS = frozenset(PROVIDES)


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
