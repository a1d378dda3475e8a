"""The sandbox stage: create the sandbox and wait until every service is ready."""

from __future__ import annotations

from mlci_dagster.providers.handle import SandboxError, SandboxHandle
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.details import ImageDetails, SandboxDetails
from mlci_dagster.stages.outcome import StageClock, StageOutcome, skipped
from mlci_dagster.vocabulary import FailureKind, Stage


def start_sandbox(ctx: LifecycleContext, image: StageOutcome[ImageDetails]
                  ) -> StageOutcome[SandboxDetails]:
    if not image.passed:
        return skipped(Stage.SANDBOX, "image did not pass")
    clock = StageClock(Stage.SANDBOX, ctx.redactor)
    spec = ctx.sandbox_spec
    teardown_s = ctx.config.timeouts.for_stage(Stage.TEARDOWN)
    handle: SandboxHandle | None = None
    try:
        handle = ctx.provider.create(
            spec, config=ctx.config.name, engine=ctx.engine, run_id=ctx.run_id,
            engine_variables=ctx.registry.settings.engines[ctx.engine].variables,
            teardown_s=teardown_s, image=image.details.attributes(),
        )
        probes = ctx.provider.wait_until_ready(handle, spec, ctx.config.timeouts.sandbox_s,
                                               image=image.details.attributes())
    except SandboxError as exc:
        # Cleanup next to creation: partial services die now; teardown re-checks later.
        if handle is not None:
            ctx.provider.destroy(handle, timeout_s=teardown_s)
        return clock.failed(
            FailureKind(exc.kind), str(exc), log_ref=exc.log_ref,
            details=SandboxDetails(handle=handle),
        )
    return clock.passed(SandboxDetails(handle=handle, probes=probes), log_ref=handle.log_dir)


