"""The teardown stage: runs whenever a sandbox may exist, idempotent, and verifies what it did."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from typing import Any

from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.debug_bundle import bundle_path, write_debug_bundle
from mlci_dagster.stages.outcome import (
    FailureKind,
    Stage,
    StageClock,
    StageOutcome,
    Status,
    skipped,
)
from mlci_dagster.stages.sandbox import handle_of


def tear_down(
    ctx: LifecycleContext, sandbox: StageOutcome, later: Sequence[StageOutcome] = ()
) -> StageOutcome:
    """Destroys the sandbox; when `sandbox` or a `later` stage (pipeline_runs, ui_smoke) failed,
    first keeps a debug bundle of it."""
    handle = handle_of(sandbox)
    if handle is None:
        return skipped(Stage.TEARDOWN, "no sandbox was created")
    clock = StageClock(Stage.TEARDOWN, ctx.redactor)
    artifacts = ctx.provider.collect_artifacts(handle)
    outcomes = [sandbox, *later]
    bundle: dict[str, Any] = {}
    if any(o.status is Status.FAIL for o in outcomes):
        bundle = keep_debug_bundle(ctx, handle, outcomes, artifacts)
    report = ctx.provider.destroy(handle)
    if report["clean"]:
        return clock.passed(log_ref=handle.log_dir, artifacts=artifacts, **bundle, **report)
    return clock.failed(
        FailureKind.INFRA,
        f"sandbox {handle.sandbox_id} not fully destroyed: leaked processes "
        f"{report['leaked_pids']}, busy ports {report['busy_ports']}, "
        f"work directory left: {report['workdir_left']}",
        log_ref=handle.log_dir, artifacts=artifacts, **bundle, **report,
    )


def keep_debug_bundle(
    ctx: LifecycleContext, handle: SandboxHandle, outcomes: list[StageOutcome], logs: list[str]
) -> dict[str, str]:
    """`debug_bundle` (its path), or `debug_bundle_error`: a bundle never stops the teardown."""
    path = bundle_path(ctx.home, ctx.run_id, ctx.config.name, ctx.engine)
    try:
        return {"debug_bundle": str(write_debug_bundle(path, handle, outcomes, logs,
                                                       ctx.redactor))}
    except (OSError, tarfile.TarError) as exc:
        return {"debug_bundle_error": f"could not write the debug bundle {path}: {exc}"}
