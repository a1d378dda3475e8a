"""Commits and pull requests of the registry's git repository, as run sets: which refs moved
(`git ls-remote`), which tier each new head starts, and which partitions it needs (`plan.py`
against the pull request's base). Dagster-free: the commit sensors only call it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from mlci_dagster.registry.loader import SETTINGS_FILE, Registry
from mlci_dagster.registry.models import RepositorySpec
from mlci_dagster.tiers.plan import PlanError, changed_paths, plan_changes, prefix_in, run_git
from mlci_dagster.vocabulary import PR_TAG, RUNS_TAG, SHA_TAG, TIER_TAG

BRANCH_PREFIX = "refs/heads/"
PULL_REF = re.compile(r"^refs/pull/(\d+)/head$")
SHA = re.compile(r"^[0-9a-f]{40}$")
FETCHED = "refs/mlci/"  # where the local mirror keeps what it fetched
GIT_TIMEOUT_S = 120
CHECKOUTS = "checkouts"  # under the home: the commit trees builds run in, one per build


class CommitError(RuntimeError):
    """The repository cannot be read, or a commit cannot be planned; the message says which."""


@dataclass(frozen=True)
class RunSet:
    """One SHA's runs of one tier: the partitions (`config|engine`) and why they were chosen."""

    sha: str
    tier: str
    partitions: tuple[tuple[str, str], ...]
    pr: int | None = None
    reason: str = ""

    def run_key(self, config: str, engine: str) -> str:
        # Run keys dedupe forever: one run per SHA, tier and partition, whatever repeats.
        return f"commit:{self.sha}:{self.tier}:{config}|{engine}"

    def tags(self) -> dict[str, str]:
        tags = {SHA_TAG: self.sha, TIER_TAG: self.tier, RUNS_TAG: str(len(self.partitions))}
        if self.pr is not None:
            tags[PR_TAG] = str(self.pr)
        return tags


@dataclass(frozen=True)
class Head:
    """A ref that moved to `sha` since the last poll (`previous` None: a ref first seen)."""

    ref: str
    sha: str
    previous: str | None

    @property
    def pr(self) -> int | None:
        found = PULL_REF.match(self.ref)
        return int(found.group(1)) if found else None

    @property
    def trigger(self) -> str:
        return "merge" if self.ref.startswith(BRANCH_PREFIX) else "pull_request"


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        done = run_git(cwd, *args, timeout_s=GIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CommitError(f"git {args[0]}: no answer in {GIT_TIMEOUT_S}s") from None
    if done.returncode != 0:
        raise CommitError(f"git {' '.join(args[:2])}: {done.stderr.strip()[-500:]}")
    return done.stdout


def repository_url(registry: Registry) -> str:
    """The repository's URL, a local path resolved against the registry root."""
    spec = _spec(registry)
    if re.match(r"^[a-z][a-z0-9+.-]*://", spec.url) or re.match(r"^[^/]+@[^/]+:", spec.url):
        return spec.url
    path = (registry.root / spec.url).resolve()
    if not path.exists():
        raise CommitError(f"mlci.yaml: repository.url: {path} does not exist (expected a git "
                          "repository, a path relative to the registry root, or a URL)")
    return str(path)


def _spec(registry: Registry) -> RepositorySpec:
    if registry.settings.repository is None:
        raise CommitError("mlci.yaml: no repository declared (expected repository: {url: ..., "
                          "branches: [main]})")
    return registry.settings.repository


def watched_refs(url: str, spec: RepositorySpec) -> dict[str, str]:
    """{ref: sha} of the watched branches and, with pull_requests, of every refs/pull/<n>/head."""
    refs = {}
    for line in _git("ls-remote", "--", url).splitlines():
        sha, _, ref = line.partition("\t")
        branch = ref.startswith(BRANCH_PREFIX) and ref.removeprefix(BRANCH_PREFIX) in spec.branches
        if branch or (spec.pull_requests and PULL_REF.match(ref)):
            refs[ref] = sha
    return refs


def moved_heads(refs: dict[str, str], last_seen: dict[str, str]) -> list[Head]:
    """The refs whose SHA differs from the last poll's, in a stable order."""
    return [Head(ref, sha, last_seen.get(ref)) for ref, sha in sorted(refs.items())
            if last_seen.get(ref) != sha]


class Mirror:
    """A local clone of the repository (no checkout) under `home`, fetched on demand, where
    merge bases and diffs are computed: a remote is never diffed in place."""

    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.path = home / "git" / hashlib.sha256(url.encode()).hexdigest()[:16]

    def fetch(self) -> None:
        if not (self.path / ".git").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            _git("init", "-q", cwd=self.path)
        _git("fetch", "-q", "--no-tags", "--force", "--", self.url,
             f"+refs/heads/*:{FETCHED}heads/*", f"+refs/pull/*:{FETCHED}pull/*", cwd=self.path)

    def is_ancestor(self, old: str, new: str) -> bool:
        try:
            _git("merge-base", "--is-ancestor", old, new, cwd=self.path)
        except CommitError:
            return False
        return True

    def first_parent(self, sha: str) -> str | None:
        parents = _git("rev-list", "--parents", "-n", "1", sha, cwd=self.path).split()
        return parents[1] if len(parents) > 1 else None

    def has(self, sha: str) -> bool:
        return (self.path / ".git").exists() and run_git(
            self.path, "cat-file", "-e", f"{sha}^{{commit}}").returncode == 0

    def fetched(self, *shas: str) -> Mirror:
        """The mirror, fetched first when it lacks one of `shas`; CommitError naming a commit
        the repository does not have."""
        if not all(self.has(sha) for sha in shas):
            self.fetch()
        for sha in shas:
            if not self.has(sha):
                raise CommitError(f"commit {sha} is not in {self.url}")
        return self

    def between(self, old: str, new: str) -> dict[str, str]:
        """SHA -> subject of the commits after `old` up to `new`, oldest first, along `new`'s
        first parents (the branch's own history: a merged branch is one step); one git call
        however long the range."""
        return dict(line.split("\0", 1) for line in _git(
            "log", "--first-parent", "--reverse", "--format=%H%x00%s", f"{old}..{new}",
            cwd=self.path).splitlines())

    def subject(self, sha: str) -> str:
        return _git("log", "-1", "--format=%s", sha, cwd=self.path).strip()

    def export(self, sha: str, target: Path) -> None:
        """The commit's files (no .git) into `target`, which must not exist yet."""
        target.mkdir(parents=True)
        with subprocess.Popen(["git", "-C", str(self.path), "archive", "--format=tar", sha],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            unreadable = ""
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    tar.extractall(target, filter="data")
            except tarfile.TarError as exc:  # git's own error, when it has one, says more
                proc.kill()
                unreadable = str(exc)
            error = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait(timeout=GIT_TIMEOUT_S) != 0 or unreadable:
                raise CommitError(f"git archive {sha[:12]}: {(error or unreadable)[-500:]}")


@dataclass(frozen=True)
class CommitTree:
    """A commit's files, exported for a build: `root` is the registry root as it is at the
    commit when the registry lives in the repository (else the registry root itself, and the
    commit's files are at `source` only)."""

    sha: str
    source: Path
    root: Path
    in_repository: bool


@contextlib.contextmanager
def commit_tree(registry: Registry, home: Path, sha: str) -> Iterator[CommitTree]:
    """The watched repository's files at `sha`, in a directory of their own under
    `home/checkouts` that is removed afterwards, whatever happens. CommitError when the
    repository cannot be read or lacks the commit."""
    mirror = Mirror(repository_url(registry), home).fetched(sha)
    checkouts = home / CHECKOUTS
    checkouts.mkdir(parents=True, exist_ok=True)
    # Named by the process that made it, so the janitor can tell one a killed build left.
    place = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{sha[:12]}-", dir=checkouts))
    try:
        mirror.export(sha, place / "tree")
        prefix = registry_prefix(registry)
        inside = prefix is not None and (place / "tree" / prefix).is_dir()
        yield CommitTree(sha, place / "tree", place / "tree" / prefix if inside
                         else registry.root, inside)
    finally:
        shutil.rmtree(place, ignore_errors=True)


def sweep_checkouts(home: Path) -> list[Path]:
    """Removes the commit trees whose process is gone (killed mid-build); returns them."""
    swept = []
    for place in sorted((home / CHECKOUTS).glob("*-*-*")):
        pid = place.name.split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(place, ignore_errors=True)
            swept.append(place)
    return swept


def registry_prefix(registry: Registry) -> str | None:
    """The registry folder from the top of the git work tree holding it (None: in none), so
    changes to its files count in the diff of the watched repository."""
    try:
        top = _git("rev-parse", "--show-toplevel", cwd=registry.root).strip()
    except CommitError:
        return None
    return prefix_in(registry, Path(top))


def tiers_with_trigger(registry: Registry, trigger: str, label: str | None = None) -> list[str]:
    return [name for name, tier in registry.settings.tiers.items()
            if tier.trigger == trigger and (label is None or tier.label == label)]


def plan_run_set(registry: Registry, mirror: Mirror | None, tier: str, sha: str, base: str | None,
                 pr: int | None = None) -> RunSet:
    """The run set of `sha` in `tier`: the tier's selection of the changes since `base` (their
    merge base), or every partition of the tier when there is no base to diff against (or no
    mirror to diff in)."""
    if registry.settings.tiers[tier].selection == "all" or base is None or mirror is None:
        # No diff to read: every partition of the tier, as a change to mlci.yaml selects them.
        plan = plan_changes(registry, [SETTINGS_FILE], tier=tier, registry_prefix="")
        reason = "selection: all" if base is not None else "no base to diff: every partition"
    else:
        try:
            revisions, changed = changed_paths(mirror.path, base, sha)
        except PlanError as exc:
            raise CommitError(f"{sha[:12]} against {base[:12]}: {exc}") from None
        plan = plan_changes(registry, changed, tier=tier, registry_prefix=registry_prefix(registry))
        reason = f"{len(changed)} file(s) changed since {revisions.merge_base[:12]}"
    return RunSet(sha, tier, tuple((p.config, p.engine) for p in plan.partitions), pr, reason)


# --- label events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelEvent:
    """A label put on a pull request whose head is `sha` (`base`: its base commit, if known)."""

    sha: str
    label: str
    pr: int | None = None
    base: str | None = None


def _value(metadata: dict[str, Any], key: str) -> Any:
    value = metadata.get(key)
    return getattr(value, "value", value)


def label_event(metadata: dict[str, Any]) -> LabelEvent:
    """The event a `pull_request_label` report carries: flat `sha`, `label` (and `pr`), or a
    GitHub `pull_request` webhook payload under `github_event`. CommitError saying what is
    missing otherwise, or when the payload is not a `labeled` action."""
    payload = _value(metadata, "github_event")
    if payload is not None:
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except json.JSONDecodeError as exc:
                raise CommitError(f"github_event: not JSON ({exc})") from None
        if not isinstance(payload, dict) or payload.get("action") != "labeled":
            action = payload.get("action") if isinstance(payload, dict) else None
            raise CommitError(f"github_event: action {action!r} (expected a pull_request "
                              "event with action 'labeled')")
        pull = payload.get("pull_request") or {}
        sha = str((pull.get("head") or {}).get("sha", ""))
        base = (pull.get("base") or {}).get("sha")
        label = str((payload.get("label") or {}).get("name", ""))
        pr = payload.get("number", pull.get("number"))
    else:
        sha, label = str(_value(metadata, "sha") or ""), str(_value(metadata, "label") or "")
        pr, base = _value(metadata, "pr"), _value(metadata, "base")
    if not SHA.match(sha) or not label:
        raise CommitError(f"expected a 40-hex sha and a label, got sha={sha!r} label={label!r}")
    return LabelEvent(sha, label, int(pr) if pr not in (None, "") else None,
                      str(base) if base and SHA.match(str(base)) else None)
