"""The results stage: one partition's lifecycle summarised as a ResultRecord."""

from __future__ import annotations

import time
from typing import Any

from mlci_dagster.cost import hourly_rate, run_cost
from mlci_dagster.culprits.reruns import rerun_due, reruns_allowed
from mlci_dagster.history.record import (
    MAX_FAILING_TESTS,
    ArtifactRecord,
    MetricRecord,
    PendingArtifact,
    PipelineRecord,
    ResultRecord,
    StageRecord,
    TestCounts,
)
from mlci_dagster.stages.context import LifecycleContext, code_version
from mlci_dagster.stages.details import PipelineRunsDetails
from mlci_dagster.stages.outcome import StageOutcome
from mlci_dagster.vocabulary import (
    Stage,
    Status,
    lifecycle_status,
    partition_key,
)


def first_failure(outcomes: list[StageOutcome]) -> StageOutcome | None:
    """The outcome of the first stage that failed, if any."""
    return next((o for o in outcomes if o.status is Status.FAIL), None)


def billed_seconds(by_stage: dict[Stage, StageOutcome]) -> float:
    """How long the sandbox may have existed: from the sandbox stage's start to the end of
    teardown; 0 when no sandbox was created."""
    sandbox, teardown = by_stage.get(Stage.SANDBOX), by_stage.get(Stage.TEARDOWN)
    if sandbox is None or sandbox.status is Status.SKIP:
        return 0.0
    end = teardown.started_at + teardown.duration_s if teardown else time.time()
    return round(max(0.0, end - sandbox.started_at), 3)


def was_preempted(pipelines: StageOutcome[PipelineRunsDetails] | None) -> bool:
    return pipelines is not None and any(p.preempted for p in pipelines.details.pipelines)


def build_record(
    ctx: LifecycleContext, outcomes: list[StageOutcome], *, interrupted: bool = False,
    artifacts: dict[str, ArtifactRecord] | None = None,
    artifacts_pending: list[PendingArtifact] = (),
) -> ResultRecord:
    """`interrupted`: the lifecycle was stopped before it finished (the record is `canceled`,
    whatever had failed by then). `artifacts`: its evidence as the artifact store took it, and
    what it did not (`artifacts_pending`)."""
    stopped = next((o for o in outcomes if o.interrupted), None)
    interrupted = interrupted or stopped is not None
    failed = None if interrupted else first_failure(outcomes)
    # Refused before it began (the budget): the first stage skipped, none failed.
    refused = failed is None and not interrupted and outcomes[0].status is Status.SKIP
    by_stage = {o.stage: o for o in outcomes}
    image, pipelines = by_stage.get(Stage.IMAGE), by_stage.get(Stage.PIPELINE_RUNS)
    teardown = by_stage.get(Stage.TEARDOWN)
    started = min(o.started_at for o in outcomes)
    finished = time.time()
    pipeline_details = pipelines.details if pipelines else PipelineRunsDetails()
    billed = billed_seconds(by_stage)
    return ResultRecord(
        partition=partition_key(ctx.config.name, ctx.engine),
        config=ctx.config.name,
        engine=ctx.engine,
        config_id=ctx.loaded.config_id,
        status=lifecycle_status(failed.stage if failed else None, refused=refused,
                                interrupted=interrupted),
        failed_stage=failed.stage if failed else None,
        failure_kind=failed.failure_kind if failed else None,
        owner=ctx.config.owners.for_stage(failed.stage) if failed else None,
        error_summary=failed.error_summary if failed else
        outcomes[0].error_summary if refused else
        f"{stopped.stage}: {stopped.error_summary}" if stopped else
        "interrupted during teardown" if interrupted else "",
        log_ref=failed.log_ref if failed else "",
        # Written by teardown before the sandbox went: its logs, probes and handle.
        debug_bundle=teardown.details.debug_bundle if teardown else "",
        image_digest=image.details.digest if image else None,
        trigger=ctx.launch.trigger,
        code_version=code_version(),
        run_id=ctx.run_id,
        started_at=started,
        finished_at=finished,
        # Wall time of the whole lifecycle, not the sum of the stages: it is what a user waits.
        duration_s=round(finished - started, 3),
        stages={o.stage: StageRecord(
            status=o.status, duration_s=round(o.duration_s, 3), failure_kind=o.failure_kind,
            error_summary=o.error_summary, log_ref=o.log_ref) for o in outcomes},
        pipelines={p.name: PipelineRecord(passed=p.passed, duration_s=round(p.duration_s, 3))
                   for p in pipeline_details.pipelines},
        metrics=reported_metrics(ctx, pipeline_details.outputs),
        billed_s=billed,
        cost_usd=run_cost(hourly_rate(ctx.config, ctx.registry.settings.costs), billed),
        preempted=was_preempted(pipelines),
        batch=ctx.launch.batch_at(started),
        sha=ctx.launch.sha,
        attempt=ctx.launch.attempt,
        rerun_of=ctx.launch.rerun_of,
        rerun_due=failed is not None and rerun_due(ctx.launch, failed.failure_kind, reruns_allowed(
            ctx.config, ctx.registry.settings.tiers.get(ctx.launch.tier or ""))),
        **tests_of(pipeline_details),
        artifacts=artifacts or {},
        artifacts_pending=list(artifacts_pending),
    )


def tests_of(details: PipelineRunsDetails) -> dict[str, Any]:
    """The record's test fields: what every pipeline's reports say, summed."""
    tests = list(details.tests.values())
    return {"tests": sum((t.counts for t in tests), TestCounts()),
            "failing_tests": [f for t in tests for f in t.failing][:MAX_FAILING_TESTS],
            "failing_tests_total": sum(t.failing_total for t in tests),
            "test_report_problems": [p for t in tests for p in t.problems],
            "test_reports": {name: t.report for name, t in details.tests.items() if t.report}}


def reported_metrics(
    ctx: LifecycleContext, outputs: dict[str, dict[str, Any]]
) -> dict[str, MetricRecord]:
    """The declared metrics the pipelines output as numbers, with which way is better."""
    metrics = {}
    for name, spec in ctx.config.metrics.items():
        pipeline, output = spec.source.split(".")
        try:
            value = float(outputs.get(pipeline, {})[output])
        except (KeyError, TypeError, ValueError):
            continue  # not reported this run (the pipeline failed, or printed no number)
        metrics[name] = MetricRecord(value=value, direction=spec.direction)
    return metrics
