"""Cleanup outside the run: tear down what a failed or cancelled run left, and the janitor.

In-run teardown is the first layer; these are the second and third, for runs that crashed,
were cancelled mid-stage, or never got to their teardown step.
"""

from collections.abc import Callable

import dagster as dg

from mlci_dagster.janitor import Verdict, sweep
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.run_workers import WORKER_TAG, fail_lost_run, lost_runs, worker_gone

JANITOR_ASSET = dg.AssetSpec(
    "sandbox_janitor", group_name="operations", kinds={"python"},
    description="One observation per janitor sweep that reaped sandboxes, listing them.",
)


def run_over(instance: dg.DagsterInstance) -> Callable[[str], bool]:
    """Whether a run is over: finished, unknown, or executed by an `mlci run` worker that is
    gone (such a run is marked failed by `end_lost_runs`)."""

    def over(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is None or run.is_finished or worker_gone(run)

    return over


def end_lost_runs(instance: dg.DagsterInstance) -> list[str]:
    """Marks failed every run in progress whose `mlci run` worker is gone; their ids."""
    lost = lost_runs(instance)
    for run in lost:
        fail_lost_run(instance, run, f"worker {run.tags[WORKER_TAG]} no longer runs")
    return [run.run_id for run in lost]


def verdicts_metadata(verdicts: list[Verdict]) -> dict[str, dg.MetadataValue]:
    return {
        "reaped": dg.MetadataValue.int(len(verdicts)),
        "clean": dg.MetadataValue.bool(all(v.report and v.report["clean"] for v in verdicts)),
        "sandboxes": dg.MetadataValue.json([v.to_dict() for v in verdicts]),
    }


@dg.sensor(
    name="sandbox_janitor", minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reaps every live sandbox whose run is over, lost its process, or expired.",
)
def sandbox_janitor(context: dg.SensorEvaluationContext, mlci: MlciResource):
    for run_id in end_lost_runs(context.instance):
        context.log.warning(f"run {run_id} lost its worker process: marked failed")
    verdicts = sweep(mlci.providers(), run_over(context.instance))
    reaped = [v for v in verdicts if v.reason]
    if not reaped:
        return dg.SkipReason(f"{len(verdicts)} live sandbox(es), none to reap")
    context.log.info(f"janitor reaped {len(reaped)}: {[v.sandbox_id for v in reaped]}")
    return dg.SensorResult(asset_events=[
        dg.AssetObservation(asset_key=JANITOR_ASSET.key, metadata=verdicts_metadata(reaped))])


def _tear_down_after(context: dg.RunStatusSensorContext, mlci: MlciResource) -> None:
    verdicts = sweep(mlci.providers(), run_over(context.instance),
                     only_run=context.dagster_run.run_id)
    if verdicts:
        context.log.info(f"tore down {[v.sandbox_id for v in verdicts]} left by "
                         f"{context.dagster_run.run_id}")


@dg.run_failure_sensor(name="teardown_after_failure",
                       default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Tears down the sandboxes a failed run left behind.")
def teardown_after_failure(context: dg.RunFailureSensorContext, mlci: MlciResource) -> None:
    _tear_down_after(context, mlci)


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.CANCELED, name="teardown_after_cancel",
                      default_status=dg.DefaultSensorStatus.RUNNING,
                      description="Tears down the sandboxes a cancelled run left behind.")
def teardown_after_cancel(context: dg.RunStatusSensorContext, mlci: MlciResource) -> None:
    _tear_down_after(context, mlci)
