"""Cleanup outside the run: tear down what a failed or cancelled run left, and the janitor.

In-run teardown is the first layer; these are the second and third, for runs that crashed,
were cancelled mid-stage, or never got to their teardown step.
"""



import dagster as dg

from mlci_dagster.assets.reservations import guard_events
from mlci_dagster.launch.workers import end_lost_runs, run_over
from mlci_dagster.providers.janitor import Verdict, sweep
from mlci_dagster.reservations.context import ReservationContext
from mlci_dagster.reservations.guard import tend
from mlci_dagster.reservations.leases import LeaseError
from mlci_dagster.resources.mlci import MlciResource

JANITOR_ASSET = dg.AssetSpec(
    "sandbox_janitor", group_name="operations", kinds={"python"},
    description="One observation per janitor sweep that reaped sandboxes, listing them.",
)


def verdicts_metadata(verdicts: list[Verdict]) -> dict[str, dg.MetadataValue]:
    return {
        "reaped": dg.MetadataValue.int(len(verdicts)),
        "clean": dg.MetadataValue.bool(all(v.report and v.report["clean"] for v in verdicts)),
        "sandboxes": dg.MetadataValue.json([v.to_dict() for v in verdicts]),
    }


def reservation_events(context: dg.SensorEvaluationContext, rctx: ReservationContext
                       ) -> list:
    """The janitor's pass over the reservations (holds past their down time taken down, dead
    holders' leases broken) as events."""
    events: list = []
    try:
        for report in tend(rctx):
            if report.actions or report.problems:
                context.log.info(f"{report.reservation}: {'; '.join(report.actions)}"
                                 + (f"; left: {report.reason}" if report.problems else ""))
                events += guard_events(rctx, rctx.spec(report.reservation), report)
    except LeaseError as exc:
        context.log.warning(f"reservations not tended: {exc}")
    return events


@dg.sensor(
    name="sandbox_janitor", minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reaps every live sandbox whose run is over, lost its process, or expired; "
                "takes down daytime holds past their down time; breaks dead holders' leases.",
)
def sandbox_janitor(context: dg.SensorEvaluationContext, mlci: MlciResource):
    for run_id in end_lost_runs(context.instance):
        context.log.warning(f"run {run_id} lost its worker process: marked failed")
    reservations = mlci.reservations(context.instance)
    events = reservation_events(context, reservations)
    verdicts = sweep(mlci.providers(), run_over(context.instance),
                     teardown_timeout=mlci.teardown_timeout(), keep=reservations.keep_held())
    reaped = [v for v in verdicts if v.reason]
    if reaped:
        context.log.info(f"janitor reaped {len(reaped)}: {[v.sandbox_id for v in reaped]}")
        events.append(dg.AssetObservation(asset_key=JANITOR_ASSET.key,
                                          metadata=verdicts_metadata(reaped)))
    if not events:
        return dg.SkipReason(f"{len(verdicts)} live sandbox(es), none to reap")
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
