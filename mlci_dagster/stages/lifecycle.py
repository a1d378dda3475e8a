"""The whole lifecycle of one partition: the five stages in order, teardown guaranteed; or,
when the month's budget would be exceeded or the caller refused the run (its reservation is
dirty or full), every stage skipped before anything is created.

The stages hand their outcomes on in memory, inside one call, so a result is never built from
another run's outcomes and a sandbox never outlives the call that created it: teardown runs in
a `finally`, after a failed stage, a harness error or an interruption (a cancelled run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator

from mlci_dagster.cost import MonthSpend, budget_refusal, estimate_run, hourly_rate
from mlci_dagster.paths import run_log_dir
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.stages.outcome import StageClock, StageOutcome, interrupted, skipped
from mlci_dagster.stages.pipelines import run_pipelines
from mlci_dagster.stages.sandbox import start_sandbox
from mlci_dagster.stages.teardown import tear_down
from mlci_dagster.stages.ui_smoke import smoke_test_ui
from mlci_dagster.vocabulary import STAGES, FailureKind, Stage, Status


def guarded(ctx: LifecycleContext, stage: Stage, body: Callable[[], StageOutcome]
            ) -> StageOutcome:
    """Runs a stage; even a harness bug becomes an `infra` outcome (its traceback redacted), so
    every later stage still runs and decides for itself. A failure always points at a log:
    where the stage wrote none (a command that could not start, a reference that did not
    resolve, a harness error), its whole error is written into one."""
    clock = StageClock(stage, ctx.redactor)
    try:
        outcome = body()
        error = outcome.error_summary
    except Exception:  # noqa: BLE001 (the one place that turns any error into an outcome)
        error = f"harness error:\n{traceback.format_exc()}"
        outcome = clock.failed(FailureKind.INFRA, error)
    if outcome.status is Status.FAIL and not outcome.log_ref:
        log = run_log_dir(ctx.home, ctx.run_id) / f"{stage}.log"
        with contextlib.suppress(OSError):  # a full disk loses this log, not the outcome
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(ctx.redactor.text(error) + "\n")
            outcome.log_ref = str(log)
    return outcome


def budget_refusal_of(ctx: LifecycleContext) -> str | None:
    """Why the month's budget refuses this run before anything is created, or None."""
    settings = ctx.registry.settings
    rate = hourly_rate(ctx.config, settings.costs)
    if settings.budget is None or not rate:
        return None
    spend = ctx.month_spend or MonthSpend(0.0, 0.0, 0)
    return budget_refusal(settings.budget, spend, estimate_run(ctx.config, rate, ctx.past_costs))


# Set when a lifecycle of this process has caught an interrupt. An interrupt can be lost before
# it reaches the lifecycle (Python drops an exception its handler raises inside a fork's
# callbacks or a finalizer): a process that sends one again until it is seen (an `mlci run`
# worker whose run was asked to stop) stops once this is set.
INTERRUPT_SEEN = threading.Event()


@contextlib.contextmanager
def signals_held(*signals: signal.Signals) -> Iterator[None]:
    """Handles `signals` only after the block: one that arrives meanwhile is noted, then sent
    again to this process once the handlers before are back. Python handles signals in the
    main thread only, so elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
                for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: set outside Python, its default
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(arrived):
            os.kill(os.getpid(), signum)


def run_lifecycle(ctx: LifecycleContext) -> Iterator[StageOutcome]:
    """Yields each stage's outcome as it finishes, teardown last, whatever happened before it.

    An interrupt inside a stage (Ctrl-C, a terminated run: any BaseException a stage raises)
    stops the stages: teardown runs, the interrupted stage and those after it are yielded as
    skips with no verdict (the interrupted one `interrupted`), then teardown, and the interrupt
    is raised again for the caller. If the caller stops early (it closes the generator), teardown
    still runs before that goes on.
    """
    INTERRUPT_SEEN.clear()
    done: list[StageOutcome] = []
    current: list[StageClock] = []  # the clock of the stage in progress

    def run(stage: Stage, body: Callable[[], StageOutcome]) -> StageOutcome:
        current[:] = [StageClock(stage, ctx.redactor)]
        done.append(guarded(ctx, stage, body))
        return done[-1]

    stop: BaseException | None = None
    try:
        refusal = ctx.refusal or budget_refusal_of(ctx)
        if refusal:
            done.append(skipped(Stage.IMAGE, refusal))
        image = done[-1] if refusal else run(Stage.IMAGE, lambda: build_image(ctx))
        yield image
        sandbox = run(Stage.SANDBOX, lambda: start_sandbox(ctx, image))
        yield sandbox
        pipelines = run(Stage.PIPELINE_RUNS, lambda: run_pipelines(ctx, image, sandbox))
        yield pipelines
        yield run(Stage.UI_SMOKE, lambda: smoke_test_ui(ctx, image, sandbox, pipelines))
    except GeneratorExit:
        raise
    except BaseException as exc:  # noqa: BLE001 (an interrupt: recorded, then raised again)
        INTERRUPT_SEEN.set()
        stop = exc
        rest = list(interrupted_rest(done, current, stop))  # timed now, before the teardown
    finally:
        # An interrupt during teardown waits until it is done: it would only leave the sandbox.
        with signals_held(signal.SIGINT, signal.SIGTERM):
            teardown = guarded(ctx, Stage.TEARDOWN, lambda: tear_down(ctx, done))
    if stop is not None:
        yield from rest
    yield teardown
    if stop is not None:
        raise stop


def interrupted_rest(done: list[StageOutcome], current: list[StageClock], stop: BaseException
                     ) -> Iterator[StageOutcome]:
    """The stage an interrupt stopped, and a skip for each stage it kept from running."""
    # KeyboardInterrupt, or Dagster's DagsterExecutionInterruptedError: said plainly.
    why = "the run was cancelled, or its process interrupted" + (
        "" if "Interrupt" in type(stop).__name__ else f" ({type(stop).__name__}: {stop})")
    finished = {o.stage for o in done}
    for stage in STAGES:
        if stage is Stage.TEARDOWN or stage in finished:
            continue
        if current and current[0].stage is stage:
            yield interrupted(current[0], why)
        else:
            yield skipped(stage, "the run was interrupted before this stage")
