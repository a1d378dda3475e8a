"""Processes a sandbox runs on this machine, whatever its provider: their environment (the
engine variables, the names to redact, the sandbox's mark) and a `command` pipeline run in a
process group of its own, recorded with the handle while it runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlci_dagster.providers.handle import SandboxHandle, render_context
from mlci_dagster.providers.logpipe import REDACT_VARS_ENV, OutputWatcher
from mlci_dagster.providers.processes import GroupResult, run_group
from mlci_dagster.redact import Redactor
from mlci_dagster.templating import render

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
