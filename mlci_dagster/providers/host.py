"""Processes a sandbox runs on this machine, whatever its provider: their environment (the
engine variables, the names to redact, the sandbox's mark) and a `command` pipeline run in a
process group of its own, recorded with the handle while it runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlci_dagster.common import clock
from mlci_dagster.common.redact import Redactor
from mlci_dagster.common.templating import render
from mlci_dagster.providers.base import ReportError
from mlci_dagster.providers.handle import (
    DestroyReport,
    SandboxError,
    SandboxHandle,
    render_context,
)
from mlci_dagster.providers.ledger import Ledger
from mlci_dagster.providers.logpipe import REDACT_VARS_ENV, OutputWatcher
from mlci_dagster.providers.processes import (
    GroupResult,
    kill_group,
    kill_marked,
    pids_text,
    process_start,
    run_group,
)
from mlci_dagster.vocabulary import FailureKind

# Every sandbox process carries its sandbox's id here, so none can hide from destroy.
SANDBOX_ID_ENV = "MLCI_SANDBOX_ID"


def sandbox_env(handle: SandboxHandle, secret_names: list[str], extra: dict[str, str]
                ) -> dict[str, str]:
    """The environment of a sandbox process: this one's, the engine variables, then its own."""
    context = render_context(handle, dict(os.environ))
    env = dict(os.environ)
    env.update(render(handle.variables, context))
    env.update(extra)
    env[REDACT_VARS_ENV] = ",".join(secret_names)
    env[SANDBOX_ID_ENV] = handle.sandbox_id
    return env


def run_command(handle: SandboxHandle, name: str, argv: list[str], env: dict[str, str],
                timeout_s: float, *, secret_names: list[str], redactor: Redactor,
                record: Callable[[SandboxHandle], None],
                watcher: OutputWatcher | None = None) -> GroupResult:
    """A pipeline process in its own group, its output streamed redacted (past `watcher`) into
    `pipeline-<name>.log`; at the timeout the whole group is killed. Its group is in the handle
    (`record` stores it) while it runs, for the janitor."""
    key = f"pipeline:{name}"
    Path(handle.workdir).mkdir(parents=True, exist_ok=True)

    def track(pgid: int) -> None:
        handle.process_groups[key] = pgid
        record(handle)

    try:
        return run_group(
            argv, cwd=handle.workdir, env=sandbox_env(handle, secret_names, env),
            timeout_s=timeout_s, log_path=Path(handle.log_dir) / f"pipeline-{name}.log",
            redactor=redactor, watcher=watcher, on_start=track,
        )
    finally:
        if handle.process_groups.pop(key, None) is not None:
            record(handle)


@dataclass
class HostCleanup:
    """What destroy stopped of a sandbox on this machine: processes left per group (and outside
    any), and the ids of those killed outside their group."""

    leaked: dict[str, list[int]]
    escaped: list[int]


def stop_processes(handle: SandboxHandle, timeout_s: float) -> HostCleanup:
    """Kills the sandbox's process groups here, last started first (a service before the
    database it depends on), each after a grace of a tenth of `timeout_s` (at most 5 s); then
    every process that left its group but carries the sandbox's mark."""
    grace_s = min(5.0, timeout_s / 10)
    groups = list(reversed(handle.process_groups.items()))
    leaked = {name: pids for name, pgid in groups if (pids := kill_group(pgid, grace_s))}
    escaped = kill_marked(SANDBOX_ID_ENV, handle.sandbox_id)
    if escaped["left"]:
        leaked["outside their group"] = escaped["left"]
    return HostCleanup(leaked, escaped["killed"])


def finish_destroy(handle: SandboxHandle, stopped: HostCleanup, problems: list[str],
                   ledger: Ledger, redactor: Redactor, **remote: Any) -> DestroyReport:
    """The end of a remote provider's destroy: the work directory removed, what is left here
    added to the provider's `problems`, the ledger entry dropped only when nothing is left.
    `remote`: what the provider checked in its own API."""
    shutil.rmtree(handle.workdir, ignore_errors=True)
    workdir_left = Path(handle.workdir).exists()
    if stopped.leaked:
        problems.append(f"local processes left: {pids_text(stopped.leaked)}")
    if workdir_left:
        problems.append(f"work directory {handle.workdir} left")
    clean = not problems
    if clean:
        ledger.remove(handle.sandbox_id)
    return DestroyReport(clean, redactor.text("; ".join(problems)),
                         sorted(handle.process_groups), stopped.escaped, stopped.leaked,
                         busy_ports=[], workdir_left=workdir_left, remote=remote)


def create_failed(provider: Any, handle: SandboxHandle, name: str, exc: Exception,
                  teardown_s: float, *, own: bool) -> SandboxError:
    """The error of a create that failed part-way, once what it made is destroyed: `own` when
    the test's own files or references are at fault (`config`), else the provider's (`infra`);
    it says what is left, if anything is."""
    report = provider.destroy(handle, timeout_s=teardown_s)
    left = "" if report.clean else f" (and it is not all gone: {report.left_behind()})"
    return SandboxError(provider.redactor.text(f"sandbox {name} could not be created: {exc}{left}"),
                        FailureKind.CONFIG if own else FailureKind.INFRA)


class ProviderHome:
    """What every provider keeps on this machine: its home (work and log directories), the
    shared ledger of live sandboxes, the secret names and their redactor, the registry root
    (for files a spec names); and the handle of a new sandbox, owned by this process."""

    name: str

    def __init__(self, home: str | Path, secret_names: list[str] | tuple[str, ...] = (),
                 root: Path | None = None) -> None:
        self.home = Path(home)
        self.ledger = Ledger(self.home / "ledger")
        self.secret_names = list(secret_names)
        self.redactor = Redactor.from_env(self.secret_names)
        self.root = Path(root) if root is not None else None

    @classmethod
    def from_settings(cls, home: Path, secret_names: list[str], root: Path | None = None,
                      settings: Any = None) -> Any:
        return cls(home, secret_names, root=root, settings=settings)

    def report_files(self, handle: SandboxHandle, pipeline: Any, pattern: str, into: Path
                     ) -> list[Path]:
        """No kind of this provider's own writes reports it can fetch (yet)."""
        raise ReportError(f"the {self.name} provider cannot fetch the reports of a "
                          f"{pipeline.kind} pipeline")

    def new_handle(self, sandbox_id: str, *, config: str, engine: str, run_id: str,
                   ttl_s: float, **fields: Any) -> SandboxHandle:
        """A handle whose work and log directories are under the home, expiring in `ttl_s`,
        owned by this process (the janitor reaps it if the process dies first)."""
        now = clock.now()  # the janitor reads expiry on the same clock
        return SandboxHandle(
            sandbox_id=sandbox_id, provider=self.name, config=config, engine=engine,
            run_id=run_id, created_at=now, expires_at=now + ttl_s,
            workdir=str(self.home / "sandboxes" / sandbox_id),
            log_dir=str(self.home / "logs" / sandbox_id),
            owner_pid=os.getpid(), owner_start=process_start(os.getpid()) or 0, **fields)
