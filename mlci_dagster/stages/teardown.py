"""The teardown stage: runs whenever a sandbox may exist, idempotent, and verifies what it did.

It destroys every sandbox of its run and partition, found in the provider's own records as well
as in the sandbox stage's outcome: a sandbox whose creation failed half-way has no handle in any
outcome, and is torn down all the same.
"""

from __future__ import annotations

import tarfile
import time

from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.debug_bundle import bundle_path, write_debug_bundle
from mlci_dagster.stages.details import SandboxTeardown, TeardownDetails
from mlci_dagster.stages.outcome import StageClock, StageOutcome, skipped
from mlci_dagster.vocabulary import FailureKind, Stage, Status


def sandboxes_of_run(ctx: LifecycleContext, outcomes: list[StageOutcome]) -> list[SandboxHandle]:
    """Every sandbox this run created for this partition: the provider's live records first (they
    hold the latest process groups), then the sandbox outcome's handle if the provider lost it."""
    found = {h.sandbox_id: h for h in ctx.provider.list_live()
             if h.run_id == ctx.run_id and (h.config, h.engine) == (ctx.config.name, ctx.engine)}
    sandbox = next((o for o in outcomes if o.stage is Stage.SANDBOX), None)
    handle = sandbox.details.handle if sandbox else None
    if handle is not None:
        found.setdefault(handle.sandbox_id, handle)
    return list(found.values())


def tear_down(ctx: LifecycleContext, outcomes: list[StageOutcome]
              ) -> StageOutcome[TeardownDetails]:
    """Destroys the run's sandboxes; when an earlier stage failed, first keeps a debug bundle."""
    handles = sandboxes_of_run(ctx, outcomes)
    if not handles:
        return skipped(Stage.TEARDOWN, "no sandbox was created")
    clock = StageClock(Stage.TEARDOWN, ctx.redactor)
    failed = any(o.status is Status.FAIL for o in outcomes)
    timeout_s = ctx.config.timeouts.for_stage(Stage.TEARDOWN)
    details = TeardownDetails()
    problems = []
    for handle in handles:
        artifacts = ctx.provider.collect_artifacts(handle)
        if failed:
            keep_debug_bundle(ctx, handle, outcomes, artifacts, details)
        started = time.monotonic()
        report = ctx.provider.destroy(handle, timeout_s=timeout_s)
        waited_out = time.monotonic() - started >= timeout_s
        details.sandboxes.append(SandboxTeardown(sandbox_id=handle.sandbox_id,
                                                 artifacts=artifacts, report=report))
        if not report.clean:
            within = f" within timeouts.teardown_s ({timeout_s:g}s)" if waited_out else ""
            problems.append(f"sandbox {handle.sandbox_id} not fully destroyed{within}: "
                            f"{report.left_behind()}")
    log_ref = handles[0].log_dir
    if not problems:
        return clock.passed(details, log_ref=log_ref)
    # Never `timeout`, even when the wait ran out: that kind says the product was too slow, and
    # history reads it as the product's (a flake, a regression range). A sandbox not gone in
    # time (a namespace stuck Terminating on a finalizer, a leaked process, a cloud delete still
    # pending) is the infrastructure failing to clean up: the product had its verdict in the
    # stages before, and the janitor tries again.
    return clock.failed(FailureKind.INFRA, "\n".join(problems), log_ref=log_ref, details=details)


def keep_debug_bundle(ctx: LifecycleContext, handle: SandboxHandle,
                      outcomes: list[StageOutcome], logs: list[str],
                      details: TeardownDetails) -> None:
    """Sets `debug_bundle` (its path), or `debug_bundle_error`: a bundle never stops the
    teardown."""
    path = bundle_path(ctx.home, ctx.run_id, ctx.config.name, ctx.engine)
    try:
        details.debug_bundle = str(write_debug_bundle(path, handle, outcomes, logs,
                                                      ctx.redactor))
    except (OSError, tarfile.TarError) as exc:
        details.debug_bundle_error = f"could not write the debug bundle {path}: {exc}"
