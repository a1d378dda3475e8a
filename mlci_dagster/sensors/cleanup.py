"""Cleanup outside the run: tear down what a failed or cancelled run left, and the janitor.

In-run teardown is the first layer; these are the second and third, for runs that crashed,
were cancelled mid-stage, or never got to their teardown step.
"""



import dagster as dg

from mlci_dagster.assets.external import JANITOR_ASSET
from mlci_dagster.assets.reservations import guard_events
from mlci_dagster.operations import janitor_pass
from mlci_dagster.providers.janitor import Verdict
from mlci_dagster.resources.mlci import MlciResource


def verdicts_metadata(verdicts: list[Verdict]) -> dict[str, dg.MetadataValue]:
    return {
        "reaped": dg.MetadataValue.int(len(verdicts)),
        "clean": dg.MetadataValue.bool(all(v.report and v.report.clean for v in verdicts)),
        "sandboxes": dg.MetadataValue.json([v.to_dict() for v in verdicts]),
    }


@dg.sensor(
    name="sandbox_janitor", minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reaps every live sandbox whose run is over, lost its process, or expired; "
                "takes down daytime holds past their down time; breaks dead holders' leases.",
)
def sandbox_janitor(context: dg.SensorEvaluationContext, mlci: MlciResource):
    done = janitor_pass(context.instance, mlci)
    for run_id in done.lost_runs:
        context.log.warning(f"run {run_id} lost its worker process: marked failed")
    for place in done.checkouts:
        context.log.info(f"{place}: a killed build's commit tree, removed")
    if done.not_tended:
        context.log.warning(f"reservations not tended: {done.not_tended}")
    events: list = []
    for report in done.tended:
        context.log.info(f"{report.reservation}: {'; '.join(report.actions)}"
                         + (f"; left: {report.reason}" if report.problems else ""))
        events += guard_events(done.reservations, done.reservations.spec(report.reservation),
                               report)
    if done.reaped:
        context.log.info(f"janitor reaped {len(done.reaped)}: "
                         f"{[v.sandbox_id for v in done.reaped]}")
        events.append(dg.AssetObservation(asset_key=JANITOR_ASSET.key,
                                          metadata=verdicts_metadata(done.reaped)))
    if not events:
        return dg.SkipReason(f"{len(done.verdicts)} live sandbox(es), none to reap")
    return dg.SensorResult(asset_events=events)


def _tear_down_after(context: dg.RunStatusSensorContext, mlci: MlciResource) -> None:
    verdicts = mlci.reap_run(context.instance, context.dagster_run.run_id)
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
