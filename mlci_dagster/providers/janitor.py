"""The janitor: reaps every live sandbox whose owning run is over or whose expiry has passed.

A crashed run is expected, not exceptional: its sandbox stays in the ledger until this finds it.
Dagster-free: whether a run is over is a question it asks a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlci_dagster.common import clock
from mlci_dagster.providers.base import Provider, providers_for
from mlci_dagster.providers.handle import DestroyReport, SandboxHandle
from mlci_dagster.providers.processes import process_start
from mlci_dagster.registry import Registry
from mlci_dagster.registry.models import DEFAULT_TIMEOUTS_S
from mlci_dagster.vocabulary import Stage


@dataclass
class Verdict:
    sandbox_id: str
    run_id: str
    reason: str  # why it is reaped, or "" when it is kept
    report: DestroyReport | None = None  # what destroy verified, once reaped
    kept: str = ""  # why it is kept although its run is over (a daytime hold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def owner_alive(handle: SandboxHandle) -> bool:
    """Whether the process that created the sandbox still runs (unknown owners count as alive)."""
    if not handle.owner_pid:
        return True
    return process_start(handle.owner_pid) == handle.owner_start


def keep_none(handle: SandboxHandle) -> str:
    """No reason to keep a sandbox whose run is over."""
    return ""


def why_reap(handle: SandboxHandle, run_over: Callable[[str], bool], now: float) -> str:
    if now >= handle.expires_at:
        return f"expired {now - handle.expires_at:.0f}s ago"
    if run_over(handle.run_id):
        return f"run {handle.run_id[:8]} is over"
    if not owner_alive(handle):
        return f"run {handle.run_id[:8]} lost its process (pid {handle.owner_pid})"
    return ""


def registry_providers(registry: Registry, home: Path) -> list[Provider]:
    """Every provider (and cluster) the registry's configs use, the local one always: what the
    janitor sweeps. A config whose file is invalid now is swept as it was last valid."""
    configs = [*registry.configs.values(), *registry.held_over.values()]
    return providers_for([c.config.sandbox for c in configs], home, registry.secret_names,
                         registry.root)


def registry_teardown_timeout(registry: Registry) -> Callable[[SandboxHandle], float]:
    """How long destroying a sandbox may take: its config's `timeouts.teardown_s`, or the
    registry's default when its config has left the registry (the handle names its config).
    Every sweep (the janitor sensor, `mlci janitor`, a run's last cleanup, the guard) is given
    this, so none waits a timeout of its own."""
    default_s = DEFAULT_TIMEOUTS_S[Stage.TEARDOWN]
    by_config = {name: loaded.config.timeouts.for_stage(Stage.TEARDOWN)
                 for name, loaded in [*registry.held_over.items(), *registry.configs.items()]}
    return lambda handle: by_config.get(handle.config, default_s)


def sweep(
    providers: Provider | Sequence[Provider], run_over: Callable[[str], bool], *,
    teardown_timeout: Callable[[SandboxHandle], float],
    dry_run: bool = False, now: float | None = None, only_run: str | None = None,
    keep: Callable[[SandboxHandle], str] = keep_none,
    select: Callable[[SandboxHandle], bool] = lambda handle: True,
) -> list[Verdict]:
    """A verdict for every live sandbox the providers know (of `only_run`, if given, and that
    `select` picks); reaps unless `dry_run`, giving each destroy `teardown_timeout(handle)`
    seconds (see `registry_teardown_timeout`). A sandbox that `keep` names a reason for is
    kept, even when its run is over, until it expires."""
    now = clock.now() if now is None else now
    verdicts = []
    for provider in [providers] if isinstance(providers, Provider) else providers:
        for handle in provider.list_live():
            if (only_run and handle.run_id != only_run) or not select(handle):
                continue
            kept = keep(handle) if now < handle.expires_at else ""
            reason = "" if kept else (why_reap(handle, run_over, now) if not only_run
                                      else f"run {only_run[:8]} failed")
            verdict = Verdict(handle.sandbox_id, handle.run_id, reason, kept=kept)
            if reason and not dry_run:
                verdict.report = provider.destroy(handle, timeout_s=teardown_timeout(handle))
            verdicts.append(verdict)
    return verdicts
