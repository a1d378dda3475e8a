"""The whole lifecycle of one partition: the five stages in order, teardown guaranteed; or,
when the month's budget would be exceeded or the caller refused the run (its reservation is
dirty or full), every stage skipped before anything is created.

The stages hand their outcomes on in memory, inside one call, so a result is never built from
another run's outcomes and a sandbox never outlives the call that created it: teardown runs in
a `finally`, after a failed stage, a harness error or an interruption (a cancelled run).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator

from mlci_dagster.cost import MonthSpend, budget_refusal, estimate_run, hourly_rate
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.stages.outcome import StageClock, StageOutcome, skipped
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


def budget_refusal_of(ctx: LifecycleContext) -> str | None:
    """Why the month's budget refuses this run before anything is created, or None."""
    settings = ctx.registry.settings
    rate = hourly_rate(ctx.config, settings.costs)
    if settings.budget is None or not rate:
        return None
    spend = ctx.month_spend or MonthSpend(0.0, 0.0, 0)
    return budget_refusal(settings.budget, spend, estimate_run(ctx.config, rate, ctx.past_costs))


def run_lifecycle(ctx: LifecycleContext) -> Iterator[StageOutcome]:
    """Yields each stage's outcome as it finishes, teardown last, whatever happened before it.

    If the caller stops early (an exception at a yield, or an interrupt inside a stage),
    teardown still runs before the exception goes on.
    """
    done: list[StageOutcome] = []
    try:
        refusal = ctx.refusal or budget_refusal_of(ctx)
        image = skipped(Stage.IMAGE, refusal) if refusal else \
            guarded(ctx, Stage.IMAGE, lambda: build_image(ctx))
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
