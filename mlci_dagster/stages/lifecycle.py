"""The whole lifecycle of one partition: the five stages in order, teardown guaranteed.

The stages hand their outcomes on in memory, inside one call, so a result is never built from
another run's outcomes and a sandbox never outlives the call that created it: teardown runs in
a `finally`, after a failed stage, a harness error or an interruption (a cancelled run).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator

from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.stages.outcome import StageClock, StageOutcome
from mlci_dagster.stages.pipelines import run_pipelines
from mlci_dagster.stages.sandbox import start_sandbox
from mlci_dagster.stages.teardown import tear_down
from mlci_dagster.stages.ui_smoke import smoke_test_ui
from mlci_dagster.vocabulary import FailureKind, Stage


def guarded(ctx: LifecycleContext, stage: Stage, body: Callable[[], StageOutcome]
            ) -> StageOutcome:
    """Runs a stage; even a harness bug becomes an `infra` outcome (its traceback redacted), so
    every later stage still runs and decides for itself."""
    clock = StageClock(stage, ctx.redactor)
    try:
        return body()
    except Exception:  # noqa: BLE001 (the one place that turns any error into an outcome)
        return clock.failed(FailureKind.INFRA, f"harness error:\n{traceback.format_exc()}")


def run_lifecycle(ctx: LifecycleContext) -> Iterator[StageOutcome]:
    """Yields each stage's outcome as it finishes, teardown last, whatever happened before it.

    If the caller stops early (an exception at a yield, or an interrupt inside a stage),
    teardown still runs before the exception goes on.
    """
    done: list[StageOutcome] = []
    try:
        image = guarded(ctx, Stage.IMAGE, lambda: build_image(ctx))
        done.append(image)
        yield image
        sandbox = guarded(ctx, Stage.SANDBOX, lambda: start_sandbox(ctx, image))
        done.append(sandbox)
        yield sandbox
        pipelines = guarded(ctx, Stage.PIPELINE_RUNS, lambda: run_pipelines(ctx, image, sandbox))
        done.append(pipelines)
        yield pipelines
        ui = guarded(ctx, Stage.UI_SMOKE, lambda: smoke_test_ui(ctx, image, sandbox, pipelines))
        done.append(ui)
        yield ui
    finally:
        teardown = guarded(ctx, Stage.TEARDOWN, lambda: tear_down(ctx, done))
    yield teardown
