"""The results stage: one partition's lifecycle summarised as a ResultRecord."""

from __future__ import annotations

import time
from typing import Any

from mlci_dagster.record import MetricRecord, PipelineRecord, ResultRecord, StageRecord
from mlci_dagster.stages.context import LifecycleContext, code_version
from mlci_dagster.stages.outcome import StageOutcome
from mlci_dagster.vocabulary import Stage, Status, lifecycle_status, partition_key


def first_failure(outcomes: list[StageOutcome]) -> StageOutcome | None:
    """The outcome of the first stage that failed, if any."""
    return next((o for o in outcomes if o.status is Status.FAIL), None)


def build_record(
    ctx: LifecycleContext, outcomes: list[StageOutcome], *, trigger: str
) -> ResultRecord:
    failed = first_failure(outcomes)
    by_stage = {o.stage: o for o in outcomes}
    image, pipelines = by_stage.get(Stage.IMAGE), by_stage.get(Stage.PIPELINE_RUNS)
    teardown = by_stage.get(Stage.TEARDOWN)
    started = min(o.started_at for o in outcomes)
    finished = time.time()
    pipeline_details = pipelines.details if pipelines else {}
    return ResultRecord(
        partition=partition_key(ctx.config.name, ctx.engine),
        config=ctx.config.name,
        engine=ctx.engine,
        config_id=ctx.loaded.config_id,
        status=lifecycle_status(failed.stage if failed else None),
        failed_stage=failed.stage if failed else None,
        failure_kind=failed.failure_kind if failed else None,
        owner=ctx.config.owners.for_stage(failed.stage) if failed else None,
        error_summary=failed.error_summary if failed else "",
        log_ref=failed.log_ref if failed else "",
        # Written by teardown before the sandbox went: its logs, probes and handle.
        debug_bundle=teardown.details.get("debug_bundle", "") if teardown else "",
        image_digest=image.details.get("digest") if image else None,
        trigger=trigger,
        code_version=code_version(ctx.registry.root),
        run_id=ctx.run_id,
        started_at=started,
        finished_at=finished,
        # Wall time of the whole lifecycle, not the sum of the stages: it is what a user waits.
        duration_s=round(finished - started, 3),
        stages={o.stage: StageRecord(
            status=o.status, duration_s=round(o.duration_s, 3), failure_kind=o.failure_kind,
            error_summary=o.error_summary, log_ref=o.log_ref) for o in outcomes},
        pipelines={p["name"]: PipelineRecord(passed=p["passed"],
                                             duration_s=round(p["duration_s"], 3))
                   for p in pipeline_details.get("pipelines", [])},
        metrics=reported_metrics(ctx, pipeline_details.get("outputs", {})),
    )


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
