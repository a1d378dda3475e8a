"""Which partitions a command acts on, and why: filters (`--config`, `--engine`, `--tier`, each
repeatable), explicit keys (`--partitions`), or what `mlci plan --json` selected (`--plan`).
Every name is checked against the registry: an unknown one is a usage error listing the known."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlci_dagster.registry import Registry
from mlci_dagster.vocabulary import partition_key, split_partition_key


class SelectionError(ValueError):
    """A selection that names what the registry lacks, or selects nothing (a usage error)."""


@dataclass(frozen=True)
class Selected:
    config: str
    engine: str
    why: str  # what selected it: a filter, a key given, or the plan's trigger

    @property
    def key(self) -> str:
        return partition_key(self.config, self.engine)


def _known(kind: str, names: list[str] | None, known: list[str]) -> None:
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise SelectionError(
            f"--{kind} {', '.join(unknown)}: not in the registry (known: "
            f"{', '.join(sorted(known)) or 'none'})")


def by_filters(registry: Registry, configs: list[str] | None = None,
               engines: list[str] | None = None, tiers: list[str] | None = None
               ) -> list[Selected]:
    """Every applicable partition whose config, engine and tier are among those given (each
    filter left out selects all)."""
    _known("config", configs, list(registry.configs))
    _known("engine", engines, registry.engines)
    declared = list(registry.settings.tiers) or sorted(
        {t for c in registry.configs.values() for t in c.config.tiers})
    _known("tier", tiers, declared)
    given = [f"--{kind} {','.join(names)}" for kind, names in
             (("config", configs), ("engine", engines), ("tier", tiers)) if names]
    why = " ".join(given) or "every partition"
    return [Selected(config, engine, why)
            for config, engine in registry.partitions()
            if (not configs or config in configs) and (not engines or engine in engines)
            and (not tiers or set(tiers) & set(registry.configs[config].config.tiers))]


def by_keys(registry: Registry, keys: list[str], why: str = "--partitions") -> list[Selected]:
    """The partitions `keys` name (`config|engine`), each one the registry has."""
    selected, problems = [], []
    for key in dict.fromkeys(keys):
        try:
            config, engine = split_partition_key(key)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        problem = registry.partition_problem(config, engine)
        if problem:
            problems.append(f"{key}: {problem}")
        else:
            selected.append(Selected(config, engine, why))
    if problems:
        raise SelectionError("; ".join(problems))
    return selected


def read_plan(path: str) -> dict[str, Any]:
    """The JSON `mlci plan --json` printed, from a file or `-` (standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        plan = json.loads(text)
    except OSError as exc:
        raise SelectionError(f"--plan {path}: cannot be read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise SelectionError(f"--plan {path}: not JSON ({exc}); expected what `mlci plan "
                             "--json` prints") from exc
    entries = plan.get("partitions") if isinstance(plan, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(p, dict) and isinstance(p.get("partition"), str) for p in entries):
        raise SelectionError(f"--plan {path}: partitions: expected a list of "
                             "{\"partition\": \"config|engine\", ...} as `mlci plan --json` "
                             "prints")
    return plan


def by_plan(registry: Registry, plan: dict[str, Any]) -> list[Selected]:
    """The partitions a plan selected, each with the change that selected it."""
    reasons = {}
    for entry in plan["partitions"]:
        triggers = entry.get("triggers") or []
        first = triggers[0] if triggers and isinstance(triggers[0], dict) else {}
        reasons[entry["partition"]] = "plan: " + (
            f"{first.get('path')} ({first.get('source')})" if first else "selected")
    found = by_keys(registry, list(reasons))
    return [Selected(s.config, s.engine, reasons[s.key]) for s in found]


def plan_label(plan: dict[str, Any]) -> str:
    """`plan pr@1a2b3c4d5e`: what a batch run from a plan is called."""
    head = ((plan.get("revisions") or {}).get("head_commit") or "")[:10]
    tier = plan.get("tier") or "changed"
    return f"plan {tier}" + (f"@{head}" if head else "")
