"""Which partitions a change needs: the files changed between two revisions (from their merge
base, as a pull request shows them) matched against the files each config depends on, narrowed
to a tier and, where the tier asks, to one representative per equivalence class."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import posixpath
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlci_dagster.common.templating import REFERENCE
from mlci_dagster.registry.loader import SETTINGS_FILE, LoadedConfig, Registry
from mlci_dagster.registry.models import TestConfig
from mlci_dagster.vocabulary import partition_key


class PlanError(ValueError):
    """A plan that cannot be made: an unknown revision or tier, a folder outside git."""


# --- what a partition depends on ------------------------------------------------------------


def _segment_pattern(segment: str) -> str:
    """One path segment of a glob as a regex: `*`, `?` and `[...]` never cross a `/`."""
    out, i = [], 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = i + 1 + (segment[i + 1:i + 2] == "!")
            end = segment.find("]", end + 1)  # a `]` first in the set is one of its members
            if end == -1:
                out.append(re.escape(char))
            else:
                members = segment[i + 1:end]
                negated = members.startswith("!")
                members = "".join(c if c == "-" else re.escape(c) for c in members[negated:])
                out.append(f"[^/{members}]" if negated else f"[{members}]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a repository path (`a/b.py`) matches `pattern` as pathlib globs files: `*`, `?`
    and `[...]` within one segment, `**` as a whole segment for any number of directories
    (a trailing `**` for every file below)."""
    if not glob.has_magic(pattern):
        return pattern.__eq__
    segments = pattern.split("/")
    parts = [("(?:[^/]+/)*" if i < len(segments) - 1 else ".*") if segment == "**"
             else _segment_pattern(segment) + ("/" if i < len(segments) - 1 else "")
             for i, segment in enumerate(segments)]
    regex = re.compile("".join(parts), re.DOTALL)
    return lambda path: regex.fullmatch(path) is not None


def _rebased(prefix: str, pattern: str) -> str | None:
    """A glob relative to the registry root as a glob from the repository's top level; None
    when it points outside the repository."""
    path = posixpath.normpath(posixpath.join(prefix, pattern))
    return None if path == ".." or path.startswith("../") else path


def registry_globs(registry: Registry, loaded: LoadedConfig) -> list[tuple[str, str]]:
    """(field, glob relative to the registry root) of every registry file the config reads:
    its own file, its image build inputs, the manifests and payload files it names."""
    config = loaded.config
    watched = [("its file", glob.escape(loaded.path.relative_to(registry.root).as_posix()))]
    build = config.image.build
    watched += [(f"image.build.inputs[{i}]", g)
                for i, g in enumerate(build.inputs or [] if build else [])]
    return watched + config.named_files()


# --- equivalence classes --------------------------------------------------------------------

# Who owns a config, where and when it runs (and how often a failure is rerun), and what
# history tracks of its outputs: configs that differ only in these behave alike. Any other
# field counts, so one added later splits classes until it is listed here.
BEHAVIOUR_NEUTRAL = frozenset({"name", "description", "owners", "engines", "tiers", "paths",
                               "class_", "metrics", "reruns"})


def behaviour_fingerprint(config: TestConfig) -> str:
    """A hash of what decides how the config runs (its image, sandbox, pipelines, UI smoke and
    timeouts). Its name counts only when those reference it as `${config}`."""
    body = config.model_dump(mode="json", by_alias=True, exclude=BEHAVIOUR_NEUTRAL)
    canonical = json.dumps(body, sort_keys=True)
    if any(ref.split(".")[0] == "config" for ref in REFERENCE.findall(canonical)):
        canonical = json.dumps(body | {"name": config.name}, sort_keys=True)
    return "fp-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def equivalence_class(config: TestConfig) -> str:
    """The config's class: `class:` when it gives one, else its behaviour fingerprint. Two
    partitions are equivalent when their configs share a class and they share the engine."""
    return config.class_ or behaviour_fingerprint(config)


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """A changed path that selected a config (None: every config), and the glob it matched."""

    config: str | None
    path: str
    glob: str
    source: str  # where the glob is written: `paths[0]`, `image.build.inputs[0]`, `mlci.yaml`

    def describe(self) -> str:
        if self.source in ("its file", SETTINGS_FILE):
            return f"{self.path} ({self.source})"
        return f"{self.path} matches {self.source} '{self.glob}'"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PlannedPartition:
    config: str
    engine: str
    equivalence_class: str
    covers: tuple[str, ...]  # the configs whose partition on this engine this run stands for
    triggers: tuple[Trigger, ...]

    @property
    def key(self) -> str:
        return partition_key(self.config, self.engine)


@dataclass(frozen=True)
class Revisions:
    repository: Path
    base: str
    head: str
    base_commit: str
    head_commit: str
    merge_base: str


@dataclass(frozen=True)
class Plan:
    tier: str | None
    selection: str  # `all` or `changed`
    representatives: bool
    changed: tuple[str, ...]
    everything: tuple[Trigger, ...]  # the changes that select every partition of the tier
    partitions: tuple[PlannedPartition, ...]
    tier_partitions: int
    matrix_partitions: int
    revisions: Revisions | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        revisions = self.revisions and {k: str(v) for k, v in
                                        dataclasses.asdict(self.revisions).items()}
        return {
            "revisions": revisions, "tier": self.tier, "selection": self.selection,
            "representatives": self.representatives, "changed": list(self.changed),
            "everything": [t.to_dict() for t in self.everything],
            "partitions": [{"partition": p.key, "config": p.config, "engine": p.engine,
                            "class": p.equivalence_class, "covers": list(p.covers),
                            "triggers": [t.to_dict() for t in p.triggers]}
                           for p in self.partitions],
            "counts": {"selected": len(self.partitions), "tier": self.tier_partitions,
                       "matrix": self.matrix_partitions},
            "notes": list(self.notes),
        }


def _tier_rule(registry: Registry, tier: str | None) -> tuple[str, bool]:
    """(selection, representatives) of `tier`. No tier, or a tier of a registry that declares
    none: the changed configs, each partition for itself."""
    declared = registry.settings.tiers
    if tier is None:
        return "changed", False
    if declared:
        if tier not in declared:
            raise PlanError(f"unknown tier '{tier}' (expected one declared in "
                            f"{registry.root / SETTINGS_FILE}: {', '.join(declared)})")
        return declared[tier].selection, declared[tier].representatives
    named = sorted({t for c in registry.configs.values() for t in c.config.tiers})
    if tier not in named:
        raise PlanError(f"no config names tier '{tier}' ({registry.root / SETTINGS_FILE} "
                        f"declares no tiers; the configs name: {', '.join(named)})")
    return "changed", False


def _matches(changed: Iterable[str], watched: Iterable[tuple[str, str | None]],
             config: str | None, memo: dict[str, list[str]]) -> list[Trigger]:
    triggers = []
    for source, pattern in watched:
        if pattern is None:  # outside the repository: no change of this diff can touch it
            continue
        if pattern not in memo:
            matches = glob_matcher(pattern)
            memo[pattern] = [path for path in changed if matches(path)]
        triggers += [Trigger(config, path, pattern, source) for path in memo[pattern]]
    return triggers


def plan_changes(registry: Registry, changed: Iterable[str], *, tier: str | None = None,
                 registry_prefix: str | None = "") -> Plan:
    """The partitions of `tier` (every config without one) that changes to `changed` (paths
    from the repository's top level) need, and why. `registry_prefix` is the registry's folder
    from that top level; None when the registry is not in the repository, whose changes then
    match only `paths:` and `plan.select_all_on`."""
    changed = tuple(changed)
    selection, representatives = _tier_rule(registry, tier)
    members = sorted((c for c in registry.configs.values()
                      if tier is None or tier in c.config.tiers), key=lambda c: c.name)
    pool = [(c, engine) for c in members for engine in registry.engines_for(c.config)]
    memo: dict[str, list[str]] = {}

    def in_repo(watched: Iterable[tuple[str, str]]) -> list[tuple[str, str | None]]:
        return [(source, None if registry_prefix is None else _rebased(registry_prefix, g))
                for source, g in watched]

    everything: list[Trigger] = []
    if selection == "changed":
        settings = registry.settings
        everything = _matches(changed, [*in_repo([(SETTINGS_FILE, SETTINGS_FILE)]), *(
            (f"plan.select_all_on[{i}]", g) for i, g in enumerate(settings.plan.select_all_on))],
                              None, memo)
    triggered: dict[tuple[str, str], list[Trigger]] = {}
    if selection == "all" or everything:
        triggered = {(c.name, engine): [] for c, engine in pool}
    else:
        by_engine = {engine: _matches(changed, in_repo(
            (f"engines.{engine}.manifests[{i}]", m) for i, m in enumerate(spec.manifests)),
                                      None, memo)
                     for engine, spec in registry.settings.engines.items()}
        for loaded in members:
            own = _matches(changed, [*((f"paths[{i}]", g) for i, g in enumerate(
                loaded.config.paths)), *in_repo(registry_globs(registry, loaded))],
                           loaded.name, memo)
            for engine in registry.engines_for(loaded.config):
                found = own + [dataclasses.replace(t, config=loaded.name)
                               for t in by_engine[engine]]
                if found:
                    triggered[(loaded.name, engine)] = found
    classes = {c.name: equivalence_class(c.config) for c in members}
    groups: dict[tuple[str, str], list[str]] = {}
    for loaded, engine in pool:
        key = (classes[loaded.name], engine) if representatives else (loaded.name, engine)
        groups.setdefault(key, []).append(loaded.name)
    planned = [PlannedPartition(names[0], engine, classes[names[0]], tuple(names), tuple(
        t for name in names for t in triggered.get((name, engine), ())))
               for (_, engine), names in groups.items()
               if any((name, engine) in triggered for name in names)]
    order = {(c.name, engine): i for i, (c, engine) in enumerate(pool)}
    return Plan(tier, selection, representatives, changed, tuple(everything),
                tuple(sorted(planned, key=lambda p: order[(p.config, p.engine)])),
                len(pool), len(registry.partitions()))


# --- git ------------------------------------------------------------------------------------


def run_git(repo: Path | None, *args: str, timeout_s: float | None = None
            ) -> subprocess.CompletedProcess[str]:
    """git in `repo` (None: here), never prompting for credentials; the caller reads the
    return code."""
    return subprocess.run(["git", *(["-C", str(repo)] if repo else []), *args],
                          capture_output=True, text=True, check=False, timeout=timeout_s,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})


def prefix_in(registry: Registry, toplevel: Path) -> str | None:
    """The registry's folder from the top of the work tree `toplevel`; None outside it."""
    try:
        return registry.root.resolve().relative_to(toplevel.resolve()).as_posix()
    except ValueError:
        return None


def changed_paths(repo: Path, base: str, head: str) -> tuple[Revisions, list[str]]:
    """The files `git diff base...head` lists: what head changed since it left base (their
    merge base), from the repository's top level, a rename as its old and its new path."""
    top = run_git(repo, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise PlanError(f"{repo}: not in a git work tree ({top.stderr.strip()}); expected the "
                        "registry inside one, or --repo naming one")
    toplevel = Path(top.stdout.strip())
    commits = []
    for flag, revision in (("--base", base), ("--head", head)):
        found = run_git(toplevel, "rev-parse", "--verify", "--quiet", "--end-of-options",
                     f"{revision}^{{commit}}")
        if found.returncode != 0:
            raise PlanError(f"{flag}: unknown revision '{revision}' in {toplevel} (expected a "
                            "commit, branch or tag there; a shallow clone may lack it)")
        commits.append(found.stdout.strip())
    merge_base = run_git(toplevel, "merge-base", *commits)
    if merge_base.returncode != 0:
        raise PlanError(f"'{base}' and '{head}' have no common ancestor in {toplevel} "
                        f"({merge_base.stderr.strip() or 'unrelated histories'}; expected head "
                        "to branch from base)")
    revisions = Revisions(toplevel, base, head, commits[0], commits[1],
                          merge_base.stdout.split()[0])
    diff = run_git(toplevel, "-c", "diff.relative=false", "diff", "--name-only", "--no-renames",
                "-z", revisions.merge_base, revisions.head_commit)
    if diff.returncode != 0:
        raise PlanError(f"git diff in {toplevel}: {diff.stderr.strip()}")
    return revisions, [path for path in diff.stdout.split("\0") if path]


def plan_revisions(registry: Registry, base: str, head: str, *, tier: str | None = None,
                   repo: str | Path | None = None) -> Plan:
    """plan_changes for the files changed from `base` to `head` in `repo` (default: the git
    repository holding the registry). The registry is the one loaded, from the work tree."""
    revisions, changed = changed_paths(Path(repo or registry.root), base, head)
    prefix = prefix_in(registry, revisions.repository)
    notes = []
    if prefix is None:
        notes.append(f"the registry {registry.root} is not in {revisions.repository}: its own "
                     "files are not in this diff, only `paths:` and plan.select_all_on match")
    else:
        checked_out = run_git(revisions.repository, "rev-parse", "--verify", "--quiet", "HEAD")
        if checked_out.stdout.strip() != revisions.head_commit:
            notes.append(f"the registry is read from the work tree, at "
                         f"{checked_out.stdout.strip()[:12] or 'no commit'}, not at --head "
                         f"{head} ({revisions.head_commit[:12]})")
    plan = plan_changes(registry, changed, tier=tier, registry_prefix=prefix)
    return dataclasses.replace(plan, revisions=revisions, notes=tuple(notes))


SHOWN_TRIGGERS = 5  # of the changes that select everything; --json lists them all


def render_plan(plan: Plan) -> str:
    """The plan for a terminal: one line per partition to run, then why."""
    lines = []
    if plan.revisions is not None:
        r = plan.revisions
        lines.append(f"{r.base}...{r.head}: {len(plan.changed)} changed file"
                     f"{'' if len(plan.changed) == 1 else 's'} since the merge base "
                     f"{r.merge_base[:12]} (head {r.head_commit[:12]})")
    rule = f"selection: {plan.selection}" + (
        ", one representative per class" if plan.representatives else "")
    lines.append(f"tier {plan.tier or '(none: every config)'} ({rule}): run "
                 f"{len(plan.partitions)} of its {plan.tier_partitions} partitions "
                 f"({plan.matrix_partitions} in the full matrix)")
    if plan.everything:
        shown = plan.everything[:SHOWN_TRIGGERS]
        lines.append("every partition, as:")
        lines += [f"      {t.describe()}" for t in shown]
        if len(plan.everything) > len(shown):
            lines.append(f"      and {len(plan.everything) - len(shown)} more")
    elif plan.selection == "all" and plan.partitions:
        lines.append("every partition, as the tier's selection is 'all'")
    elif not plan.partitions:
        lines.append("nothing to run: no changed file is one a config of the tier depends on")
    for p in plan.partitions:
        covers = f"  covers {', '.join(p.covers)}" if len(p.covers) > 1 else ""
        lines.append(f"  {p.key}  class {p.equivalence_class}{covers}")
        lines += [f"      {t.config}: {t.describe()}" for t in p.triggers]
    return "\n".join(lines)
