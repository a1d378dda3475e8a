"""The teardown stage: runs whenever a sandbox may exist, idempotent, and verifies what it did."""

from __future__ import annotations

from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.outcome import FailureKind, Stage, StageClock, StageOutcome, skipped
from mlci_dagster.stages.sandbox import handle_of


def tear_down(ctx: LifecycleContext, sandbox: StageOutcome) -> StageOutcome:
    handle = handle_of(sandbox)
    if handle is None:
        return skipped(Stage.TEARDOWN, "no sandbox was created")
    clock = StageClock(Stage.TEARDOWN, ctx.redactor)
    artifacts = ctx.provider.collect_artifacts(handle)
    report = ctx.provider.destroy(handle)
    if report["clean"]:
        return clock.passed(log_ref=handle.log_dir, artifacts=artifacts, **report)
    return clock.failed(
        FailureKind.INFRA,
        f"sandbox {handle.sandbox_id} not fully destroyed: leaked processes "
        f"{report['leaked_pids']}, busy ports {report['busy_ports']}, "
        f"work directory left: {report['workdir_left']}",
        log_ref=handle.log_dir, artifacts=artifacts, **report,
    )
