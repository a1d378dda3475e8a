"""The six stage assets. Each body hands off to the Dagster-free stage and records its outcome.

A stage never raises: a failure is an outcome, so every later stage still runs and decides for
itself (skip, or tear down). Only `results` ends the run failed, through a blocking check, after
its record is stored.
"""

import traceback
from collections.abc import Callable

import dagster as dg

from mlci_dagster.resources.mlci import MlciResource, trigger_of
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.stages.outcome import FailureKind, Stage, StageClock, StageOutcome, Status
from mlci_dagster.stages.pipelines import run_pipelines
from mlci_dagster.stages.results import PASS, build_record
from mlci_dagster.stages.sandbox import start_sandbox
from mlci_dagster.stages.teardown import tear_down
from mlci_dagster.stages.ui_smoke import smoke_test_ui

STAGE_CHECK = "stage_passed"
LIFECYCLE_CHECK = "lifecycle_passed"


def outcome_metadata(outcome: StageOutcome) -> dict[str, object]:
    return {
        "status": str(outcome.status),
        "duration_s": dg.MetadataValue.float(round(outcome.duration_s, 3)),
        "failure_kind": str(outcome.failure_kind or ""),
        "error_summary": dg.MetadataValue.md(f"```\n{outcome.error_summary}\n```")
        if outcome.error_summary else "",
        "log_ref": dg.MetadataValue.path(outcome.log_ref) if outcome.log_ref else "",
        "details": dg.MetadataValue.json(outcome.details),
    }


def stage_check(outcome: StageOutcome) -> dg.AssetCheckResult:
    """Green on pass, red on fail, yellow on skip: a red cell says which stage broke."""
    return dg.AssetCheckResult(
        check_name=STAGE_CHECK,
        passed=outcome.status is Status.PASS,
        severity=dg.AssetCheckSeverity.WARN if outcome.status is Status.SKIP
        else dg.AssetCheckSeverity.ERROR,
        description=f"{outcome.stage}: {outcome.status}"
        + (f" ({outcome.failure_kind})" if outcome.failure_kind else ""),
        metadata={"status": str(outcome.status), "failure_kind": str(outcome.failure_kind or ""),
                  "error_summary": outcome.error_summary},
    )


def run_stage(
    context: dg.AssetExecutionContext,
    mlci: MlciResource,
    stage: Stage,
    body: Callable[[LifecycleContext], StageOutcome],
) -> dg.MaterializeResult:
    """Runs a stage; even a harness bug becomes an `infra` outcome, so teardown still runs."""
    clock = StageClock(stage)
    try:
        outcome = body(mlci.lifecycle(context))
    except Exception:  # noqa: BLE001 (the one place that turns any error into an outcome)
        outcome = clock.failed(FailureKind.INFRA, f"harness error:\n{traceback.format_exc()}")
    context.log.info(f"{stage}: {outcome.status} in {outcome.duration_s:.2f}s"
                     + (f" ({outcome.failure_kind})" if outcome.failure_kind else ""))
    return dg.MaterializeResult(
        value=outcome, metadata=outcome_metadata(outcome), check_results=[stage_check(outcome)]
    )


def lifecycle_assets(partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    """The six stage assets over `partitions` (config × engine).

    Asset bodies carry no return annotation: with check outputs Dagster would read one as the
    type of every output.
    """

    def stage_asset(name: str, description: str) -> Callable:
        return dg.asset(
            name=name, partitions_def=partitions, group_name="lifecycle", kinds={"python"},
            description=description,
            check_specs=[dg.AssetCheckSpec(STAGE_CHECK, asset=name,
                                           description=f"the {name} stage passed")],
        )

    @stage_asset("image", "The image one partition tests: its digest, and whether it was cached.")
    def image(context: dg.AssetExecutionContext, mlci: MlciResource):
        return run_stage(context, mlci, Stage.IMAGE, build_image)

    @stage_asset("sandbox", "The sandbox of one partition: its handle and readiness probes.")
    def sandbox(
        context: dg.AssetExecutionContext, mlci: MlciResource, image: StageOutcome
    ):
        return run_stage(context, mlci, Stage.SANDBOX, lambda lc: start_sandbox(lc, image))

    @stage_asset("pipeline_runs", "Every pipeline of one partition run in its sandbox, in order.")
    def pipeline_runs(
        context: dg.AssetExecutionContext, mlci: MlciResource, image: StageOutcome,
        sandbox: StageOutcome,
    ):
        return run_stage(context, mlci, Stage.PIPELINE_RUNS,
                         lambda lc: run_pipelines(lc, image, sandbox))

    @stage_asset("ui_smoke", "The UI routes of one partition: status, content, API and latency.")
    def ui_smoke(
        context: dg.AssetExecutionContext, mlci: MlciResource, image: StageOutcome,
        sandbox: StageOutcome, pipeline_runs: StageOutcome,
    ):
        return run_stage(context, mlci, Stage.UI_SMOKE,
                         lambda lc: smoke_test_ui(lc, image, sandbox, pipeline_runs))

    @stage_asset("teardown", "The sandbox of one partition destroyed, and verified gone.")
    def teardown(
        context: dg.AssetExecutionContext, mlci: MlciResource, sandbox: StageOutcome,
        pipeline_runs: StageOutcome, ui_smoke: StageOutcome,
    ):
        # pipeline_runs and ui_smoke order teardown after them; a failure of either (or of the
        # sandbox) makes teardown keep a debug bundle before destroying the sandbox.
        return run_stage(context, mlci, Stage.TEARDOWN,
                         lambda lc: tear_down(lc, sandbox, [pipeline_runs, ui_smoke]))

    @dg.asset(
        partitions_def=partitions, group_name="lifecycle", kinds={"python"},
        description="One lifecycle record per run of a partition: pass or fail-<stage>.",
        check_specs=[dg.AssetCheckSpec(LIFECYCLE_CHECK, asset="results", blocking=True,
                                       description="every stage passed")],
    )
    def results(
        context: dg.AssetExecutionContext, mlci: MlciResource, image: StageOutcome,
        sandbox: StageOutcome, pipeline_runs: StageOutcome, ui_smoke: StageOutcome,
        teardown: StageOutcome,
    ):
        outcomes = [image, sandbox, pipeline_runs, ui_smoke, teardown]
        record = build_record(mlci.lifecycle(context), outcomes,
                              trigger=trigger_of(context.run.tags))
        context.log.info(f"lifecycle {record['status']} in {record['duration_s']:.2f}s")
        passed = record["status"] == PASS
        return dg.MaterializeResult(
            value=record,
            metadata={
                "status": record["status"],
                "failed_stage": record["failed_stage"] or "",
                "duration_s": dg.MetadataValue.float(record["duration_s"]),
                "image_digest": record["image_digest"] or "",
                "trigger": record["trigger"],
                "config_id": record["config_id"],
                "code_version": record["code_version"],
                "debug_bundle": dg.MetadataValue.path(record["debug_bundle"])
                if record["debug_bundle"] else "",
                "record": dg.MetadataValue.json(record),
            },
            # Blocking: a failed lifecycle fails the run, after this record is stored.
            check_results=[dg.AssetCheckResult(
                check_name=LIFECYCLE_CHECK, passed=passed,
                description=record["status"] if passed else
                f"{record['status']} (owner: {record['owner']})",
                metadata={"status": record["status"], "owner": record["owner"] or "",
                          "error_summary": record["error_summary"]},
            )],
        )

    return [image, sandbox, pipeline_runs, ui_smoke, teardown, results]
