"""The provider interface every sandbox provider implements, and the lookup by name.

Stages, the janitor and the resources name only this module; a provider is a folder of its own
(`providers/local/`, `providers/kubernetes/`) with the same verbs, imported when first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import requests

from mlci_dagster.providers.handle import DestroyReport, SandboxError, SandboxHandle
from mlci_dagster.providers.logpipe import OutputWatcher
from mlci_dagster.providers.processes import GroupResult
from mlci_dagster.registry.base import PROVIDERS
from mlci_dagster.vocabulary import FailureKind

__all__ = ["PROVIDERS", "PipelineResult", "Provider", "ReportError", "SandboxError",
           "SandboxHandle",
           "DestroyReport", "provider_class", "providers_for"]


MAX_REPORT_BYTES = 256 * 1024 * 1024  # a test report fetched from a sandbox, at most
MAX_REPORT_FILES = 100  # per declared report: a glob that matches more is cut, and says so


class ReportError(Exception):
    """A test report that could not be fetched from where its pipeline ran."""


def report_copy_path(path: str, into: Path) -> Path | None:
    """Where a report fetched from `path` (on the pipeline's side) is copied under `into`: its
    whole path, so files of one name in two directories stay apart; None for a path that
    names no file or would leave `into` (a `..`)."""
    parts = [part for part in PurePosixPath(path).parts if part != "/"]
    if not parts or ".." in parts:
        return None
    return into.joinpath(*parts)


@dataclass
class PipelineResult:
    """How one pipeline went: every pipeline kind, on every provider, reports this."""

    name: str
    kind: str
    passed: bool
    duration_s: float
    failure_kind: FailureKind | None = None
    summary: str = ""
    log_ref: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    # The sandbox went away under the pipeline (a spot TPU reclaimed): retried, never a verdict.
    preempted: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # what the pipeline's kind reports

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failure_kind"] = str(self.failure_kind) if self.failure_kind else None
        return data


@runtime_checkable
class Provider(Protocol):
    """Creates sandboxes, runs pipelines in them and destroys them, provably.

    Every verb but `create` and `wait_until_ready` takes a handle alone, so a provider rebuilt
    from the ledger, or from what `list_live` finds in the provider itself, can destroy what an
    earlier process created. Errors in `create` and `wait_until_ready` are `SandboxError`s that
    carry a failure kind.
    """

    name: str

    def create(self, spec: Any, *, config: str, engine: str, run_id: str,
               engine_variables: dict[str, str], teardown_s: float,
               image: dict[str, Any] | None = None) -> SandboxHandle:
        """Starts a sandbox for (config, engine); the handle is in the ledger before anything
        exists to leak, labelled with the run, the launching process and the expiry. What a
        failed create made is destroyed within `teardown_s` (the config's teardown timeout)."""
        ...

    def wait_until_ready(self, handle: SandboxHandle, spec: Any, timeout_s: float,
                         image: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """What was checked, per service or object; raises SandboxError naming what is not."""
        ...

    def http(self, handle: SandboxHandle) -> requests.Session:
        """A session that reaches the handle's endpoints (credentials included)."""
        ...

    def run_command(self, handle: SandboxHandle, name: str, argv: list[str], env: dict[str, str],
                    timeout_s: float, watcher: OutputWatcher | None = None) -> GroupResult:
        """A `command` pipeline: a process on this machine with the sandbox's variables."""
        ...

    def run_pipeline(self, handle: SandboxHandle, pipeline: Any, context: dict[str, Any],
                     timeout_s: float) -> PipelineResult:
        """A pipeline of a kind only this provider runs (a Kubernetes Job, a custom resource)."""
        ...

    def report_files(self, handle: SandboxHandle, pipeline: Any, pattern: str, into: Path
                     ) -> list[Path]:
        """The test reports a pipeline of a kind only this provider runs wrote (`pattern`, a
        glob as its config gives it, rendered), copied into the directory `into` on this
        machine, at most MAX_REPORT_BYTES each; ReportError says what could not be fetched.
        `command` pipelines run on this machine: their reports are not asked for here."""
        ...

    def collect_artifacts(self, handle: SandboxHandle) -> list[str]:
        """Files for the debug bundle: logs, and the state of what the sandbox holds."""
        ...

    def destroy(self, handle: SandboxHandle, *, timeout_s: float) -> DestroyReport:
        """Idempotent; returns what it verified, with `clean` true only if nothing is left.
        `timeout_s` is the sandbox's config's `timeouts.teardown_s`, never a default: the
        stages pass their config's, the janitor asks `janitor.registry_teardown_timeout`."""
        ...

    def list_live(self) -> list[SandboxHandle]:
        """Every sandbox it created that still exists, found in the provider itself where it
        can be (labels, tags), so the janitor works when the local ledger is lost."""
        ...

    @classmethod
    def from_settings(cls, home: Path, secret_names: list[str], root: Path | None = None,
                      settings: Any = None) -> Provider:
        """The provider keeping its state under `home`, for the sandboxes `settings` (what
        settings_of returned) picks: what build_provider and providers_for call."""
        ...

    @staticmethod
    def settings_of(spec: Any) -> Any:
        """The part of a sandbox spec that picks one instance of the provider (a Kubernetes
        cluster, an AWS account and region), comparable and printable: sandboxes with equal
        settings share one provider. None when one instance serves every sandbox."""
        ...


def provider_class(name: str) -> type:
    if name not in PROVIDERS:
        raise KeyError(f"unknown provider '{name}' (expected one of: {', '.join(PROVIDERS)})")
    module, _, attribute = PROVIDERS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_provider(name: str, home: Path, secret_names: Sequence[str] = (),
                   root: Path | None = None, settings: Any = None) -> Provider:
    """The provider `name`, keeping its state under `home`. `root` is the registry folder (for
    files a spec names); `settings` the provider-specific part of a sandbox spec that picks one
    instance of it (a Kubernetes cluster), or None for the default."""
    return provider_class(name).from_settings(home=home, secret_names=list(secret_names),
                                              root=root, settings=settings)


def providers_for(specs: Sequence[Any], home: Path, secret_names: Sequence[str] = (),
                  root: Path | None = None) -> list[Provider]:
    """One provider per distinct (provider, settings) among `specs` (the registry's sandbox
    specs), the local one always among them: what the janitor sweeps."""
    seen: dict[tuple[str, str], Provider] = {}
    for spec in [None, *specs]:
        name = "local" if spec is None else spec.provider
        settings = provider_class(name).settings_of(spec) if spec is not None else None
        key = (name, repr(settings))
        if key not in seen:
            seen[key] = build_provider(name, home, secret_names, root, settings)
    return list(seen.values())
