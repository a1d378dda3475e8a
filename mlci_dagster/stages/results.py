"""The results record: one partition's lifecycle, summarised for history and reports."""

from __future__ import annotations

import time
from typing import Any

from mlci_dagster.stages.context import LifecycleContext, code_version
from mlci_dagster.stages.outcome import Stage, StageOutcome, Status

PASS = "pass"


def lifecycle_status(outcomes: list[StageOutcome]) -> tuple[str, StageOutcome | None]:
    """`pass`, or `fail-<first failing stage>` with that stage's outcome."""
    for outcome in outcomes:
        if outcome.status is Status.FAIL:
            return f"fail-{outcome.stage}", outcome
    return PASS, None


def build_record(
    ctx: LifecycleContext, outcomes: list[StageOutcome], *, trigger: str
) -> dict[str, Any]:
    status, failed = lifecycle_status(outcomes)
    image = next(o for o in outcomes if o.stage is Stage.IMAGE)
    started = min(o.started_at for o in outcomes)
    pipelines = next(o for o in outcomes if o.stage is Stage.PIPELINE_RUNS)
    teardown = next((o for o in outcomes if o.stage is Stage.TEARDOWN), None)
    return {
        "partition": f"{ctx.config.name}|{ctx.engine}",
        "config": ctx.config.name,
        "engine": ctx.engine,
        "config_id": ctx.loaded.config_id,
        "status": status,
        "failed_stage": str(failed.stage) if failed else None,
        "failure_kind": str(failed.failure_kind) if failed and failed.failure_kind else None,
        "owner": ctx.config.owners.for_stage(failed.stage) if failed else None,
        "error_summary": failed.error_summary if failed else "",
        "log_ref": failed.log_ref if failed else "",
        # Written by teardown before the sandbox went: its logs, probes and handle.
        "debug_bundle": teardown.details.get("debug_bundle", "") if teardown else "",
        "image_digest": image.details.get("digest"),
        "trigger": trigger,
        "code_version": code_version(ctx.registry.root),
        "run_id": ctx.run_id,
        "started_at": started,
        "finished_at": time.time(),
        "duration_s": round(sum(o.duration_s for o in outcomes), 3),
        "stages": {
            str(o.stage): {
                "status": str(o.status),
                "duration_s": round(o.duration_s, 3),
                "failure_kind": str(o.failure_kind) if o.failure_kind else None,
                "error_summary": o.error_summary,
                "log_ref": o.log_ref,
            }
            for o in outcomes
        },
        "pipelines": {
            p["name"]: {"passed": p["passed"], "duration_s": round(p["duration_s"], 3)}
            for p in pipelines.details.get("pipelines", [])
        },
        "metrics": reported_metrics(ctx, pipelines.details.get("outputs", {})),
    }


def reported_metrics(
    ctx: LifecycleContext, outputs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The declared metrics the pipelines output as numbers, with which way is better."""
    metrics = {}
    for name, spec in ctx.config.metrics.items():
        pipeline, output = spec.source.split(".")
        try:
            value = float(outputs.get(pipeline, {})[output])
        except (KeyError, TypeError, ValueError):
            continue  # not reported this run (the pipeline failed, or printed no number)
        metrics[name] = {"value": value, "direction": spec.direction}
    return metrics
