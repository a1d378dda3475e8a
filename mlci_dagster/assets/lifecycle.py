"""The lifecycle as one multi-asset: six stage assets that are always materialized together.

One op runs the Dagster-free lifecycle (`stages.lifecycle.run_lifecycle`) and yields each
stage's materialization, with its `stage_passed` check, as the stage finishes. It cannot be
subset: a selection of some lifecycle assets (one asset's Materialize button, a backfill of
`results` alone) is refused by Dagster with a message naming the rest, so a result is never built
from another run's outcomes and a sandbox never outlives its run. Nothing goes through an IO
manager: the outcomes pass in memory, and each materialization's metadata holds a bounded
summary that links the logs.
"""


import base64
import json
from pathlib import Path
from typing import Any

import dagster as dg

from mlci_dagster.artifacts.evidence import planned, upload
from mlci_dagster.assets.reservations import leases_observation, record_admission
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.stages.debug_bundle import screenshots_of
from mlci_dagster.stages.lifecycle import run_lifecycle
from mlci_dagster.stages.outcome import StageOutcome
from mlci_dagster.stages.results import build_record
from mlci_dagster.vocabulary import RESULTS, STAGES, Stage, Status, split_partition_key

LIFECYCLE_OP = "run_lifecycle"  # the op; the job that runs it is `lifecycle`
STAGE_CHECK = "stage_passed"
LIFECYCLE_CHECK = "lifecycle_passed"
# A stage's details in metadata stay small whatever the stage saw; the logs hold the rest.
DETAILS_MAX_CHARS = 4000
PREEMPTION_RETRY_WAIT_S = 5  # a spot node is not back at once
MAX_SCREENSHOTS = 3

DESCRIPTIONS = {
    Stage.IMAGE: "The image one partition tests: its digest, and whether it was cached.",
    Stage.SANDBOX: "The sandbox of one partition: its handle and readiness probes.",
    Stage.PIPELINE_RUNS: "Every pipeline of one partition run in its sandbox, in order.",
    Stage.UI_SMOKE: "The UI routes of one partition: status, content, API and latency.",
    Stage.TEARDOWN: "The sandbox of one partition destroyed, and verified gone.",
}
# The graph the UI draws, as DESIGN.md does: image → sandbox → pipeline_runs → ui_smoke →
# teardown → results, and the sandbox's handle on to its teardown.
UPSTREAM = {
    Stage.IMAGE: [],
    Stage.SANDBOX: [Stage.IMAGE],
    Stage.PIPELINE_RUNS: [Stage.SANDBOX],
    Stage.UI_SMOKE: [Stage.PIPELINE_RUNS],
    Stage.TEARDOWN: [Stage.SANDBOX, Stage.UI_SMOKE],
}


def bounded_json(value: Any, limit: int = DETAILS_MAX_CHARS) -> Any:
    """`value` if its JSON is within `limit` characters, else a note with its head."""
    text = json.dumps(value, default=str)
    if len(text) <= limit:
        return value
    return {"truncated": f"{len(text)} characters; see log_ref", "head": text[:limit // 2]}


def screenshot_metadata(outcomes: list[StageOutcome]) -> dict[str, object]:
    """The browser checks' screenshots, shown inline by the Dagster UI (a few, each small);
    not those kept on the machine (`upload_screenshot: false`)."""
    shown = {}
    for i, shot in enumerate(screenshots_of(outcomes, travelling=True)[:MAX_SCREENSHOTS]):
        try:
            data = base64.b64encode(Path(shot).read_bytes()).decode()
        except OSError:
            continue
        shown[f"screenshot_{i}"] = dg.MetadataValue.md(
            f"![{Path(shot).name}](data:image/jpeg;base64,{data})")
    return shown


def outcome_metadata(outcome: StageOutcome) -> dict[str, object]:
    return {
        **screenshot_metadata([outcome]),
        "status": str(outcome.status),
        "duration_s": dg.MetadataValue.float(round(outcome.duration_s, 3)),
        "failure_kind": str(outcome.failure_kind or ""),
        "error_summary": dg.MetadataValue.md(f"```\n{outcome.error_summary}\n```")
        if outcome.error_summary else "",
        "log_ref": dg.MetadataValue.path(outcome.log_ref) if outcome.log_ref else "",
        "details": dg.MetadataValue.json(bounded_json(outcome.details.model_dump(mode="json"))),
    }


def stage_check(outcome: StageOutcome) -> dg.AssetCheckResult:
    """Green on pass, red on fail, yellow on skip: a red cell says which stage broke."""
    return dg.AssetCheckResult(
        asset_key=str(outcome.stage),
        check_name=STAGE_CHECK,
        passed=outcome.status is Status.PASS,
        severity=dg.AssetCheckSeverity.WARN if outcome.status is Status.SKIP
        else dg.AssetCheckSeverity.ERROR,
        description=f"{outcome.stage}: {outcome.status}"
        + (f" ({outcome.failure_kind})" if outcome.failure_kind else ""),
        metadata={"status": str(outcome.status), "failure_kind": str(outcome.failure_kind or ""),
                  "error_summary": outcome.error_summary},
    )


def results_materialization(record: ResultRecord, outcomes: list[StageOutcome] = ()
                            ) -> dg.MaterializeResult:
    """The record as metadata (the event log is the source of truth), and the blocking check
    that fails the run, after the record is stored, when the lifecycle failed."""
    return dg.MaterializeResult(
        asset_key=RESULTS,
        metadata={
            "status": record.status,
            "failed_stage": str(record.failed_stage or ""),
            "duration_s": dg.MetadataValue.float(record.duration_s),
            "cost_usd": dg.MetadataValue.float(record.cost_usd)
            if record.cost_usd is not None else "",
            "image_digest": record.image_digest or "",
            "trigger": record.trigger,
            "config_id": record.config_id,
            "code_version": record.code_version,
            "debug_bundle": dg.MetadataValue.path(record.debug_bundle)
            if record.debug_bundle else "",
            "record": dg.MetadataValue.json(record.to_json()),
            **screenshot_metadata(list(outcomes)),
        },
        # A refused or interrupted run is yellow: it neither passed nor failed what it tested.
        check_results=[dg.AssetCheckResult(
            asset_key=RESULTS, check_name=LIFECYCLE_CHECK, passed=record.passed,
            severity=dg.AssetCheckSeverity.ERROR if record.judged
            else dg.AssetCheckSeverity.WARN,
            description=record.status if record.passed else
            f"{record.status}: {record.error_summary}" if not record.judged else
            f"{record.status} (owner: {record.owner})",
            metadata={"status": record.status, "owner": record.owner or "",
                      "error_summary": record.error_summary},
        )],
    )


def lifecycle_assets(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The six lifecycle assets over `partitions` (config × engine), as one unsubsettable op."""
    specs = [dg.AssetSpec(str(stage), description=DESCRIPTIONS[stage], group_name="lifecycle",
                          kinds={"python"}, partitions_def=partitions,
                          deps=[str(s) for s in UPSTREAM[stage]])
             for stage in STAGES]
    specs.append(dg.AssetSpec(
        RESULTS, description="One lifecycle record per run of a partition: `pass`, `fail-<stage>` "
        "(the first stage that failed), `skip` (refused before it began) or `canceled`.",
        group_name="lifecycle", kinds={"python"}, partitions_def=partitions,
        deps=[str(Stage.TEARDOWN)]))
    checks = [dg.AssetCheckSpec(STAGE_CHECK, asset=str(stage),
                                description=f"the {stage} stage passed") for stage in STAGES]
    checks.append(dg.AssetCheckSpec(LIFECYCLE_CHECK, asset=RESULTS, blocking=True,
                                    description="every stage passed"))

    @dg.multi_asset(name=LIFECYCLE_OP, specs=specs, check_specs=checks, can_subset=False,
                    partitions_def=partitions,
                    description="The whole lifecycle of one config × engine, teardown included.")
    def lifecycle(context: dg.AssetExecutionContext, mlci: MlciResource):
        # A partition the registry lacks (a key added by hand in the UI, a config removed
        # since) is refused before anything is created.
        problem = mlci.registry().partition_problem(*split_partition_key(context.partition_key))
        if problem:
            raise dg.Failure(description=f"partition {context.partition_key} refused: {problem}",
                             allow_retries=False)
        # Its reservation's lease is held from before the image to after the teardown.
        stop: BaseException | None = None
        with mlci.admission(context) as admission:
            record_admission(context, admission)
            ctx = mlci.lifecycle(context, refusal=admission.refusal)
            outcomes = []
            try:
                for outcome in run_lifecycle(ctx):
                    outcomes.append(outcome)
                    context.log.info(f"{outcome.stage}: {outcome.status} in "
                                     f"{outcome.duration_s:.2f}s" + (
                                         f" ({outcome.failure_kind})" if outcome.failure_kind
                                         else ""))
                    yield dg.MaterializeResult(asset_key=str(outcome.stage),
                                               metadata=outcome_metadata(outcome),
                                               check_results=[stage_check(outcome)])
            except GeneratorExit:
                raise
            except BaseException as exc:  # noqa: BLE001 (interrupted: recorded, raised again)
                stop = exc  # the lifecycle tore down first
        if admission.lease is not None:
            context.log_event(leases_observation(admission.rctx,
                                                 admission.rctx.spec(admission.lease.reservation)))
        # Its evidence to the artifact store, after teardown; an interrupted run's is left to
        # the artifact_upload sensor, so that stopping does not wait for the store.
        settings = ctx.registry.settings.artifacts
        pieces = planned(context.partition_key, context.run.run_id, outcomes)
        artifacts, pending = ({}, [p.model_copy(update={"why": "the run was interrupted"})
                                   for p in pieces]) if stop is not None else upload(
            mlci.artifact_store(), settings, pieces)
        for piece in pending:
            context.log.warning(f"{piece.path}: not uploaded yet (kept here, retried by the "
                                f"artifact_upload sensor): {piece.why}")
        record = build_record(ctx, outcomes, interrupted=stop is not None, artifacts=artifacts,
                              artifacts_pending=pending)
        context.log.info(f"lifecycle {record.status} in {record.duration_s:.2f}s"
                         + (f", ${record.cost_usd:.4f}" if record.cost_usd else ""))
        yield results_materialization(record, outcomes)
        if stop is not None:
            # Dagster ends the run CANCELED when termination was asked (its status CANCELING:
            # the UI's Terminate, `mlci run`'s Ctrl-C), else failed.
            raise stop
        retries = ctx.config.sandbox.preemption_retries()
        if record.preempted and context.retry_number < retries:
            # Dagster's step retry: the attempt stays recorded (infra), and a new one starts.
            raise dg.RetryRequested(max_retries=retries, seconds_to_wait=PREEMPTION_RETRY_WAIT_S)

    return lifecycle
