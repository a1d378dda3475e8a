"""Reservations in the Dagster UI: an asset per reservation whose observations show its leases
and whose `reservation_clean` check is the guard, and `held_sandbox`, a reservation's daytime
deployment (one materialization per up or down; no results, no history).

The reservations' logic is the Dagster-free `mlci_dagster.reservations`; this module only maps
its reports onto events, and records them from wherever the guard ran (a run, the nightly
schedule, the janitor, `mlci`).
"""

from typing import Literal

import dagster as dg

from mlci_dagster.registry.models import Settings
from mlci_dagster.registry.reservations import ReservationSpec
from mlci_dagster.reservations.admission import Admission
from mlci_dagster.reservations.context import ReservationContext
from mlci_dagster.reservations.guard import GuardReport, guard
from mlci_dagster.reservations.holds import UP, HoldReport, hold_down, hold_up
from mlci_dagster.reservations.leases import Lease, LeaseKind
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.vocabulary import (
    HELD_SANDBOX,
    HOLD_DOWN_JOB,
    HOLD_UP_JOB,
    SCHEDULE_TAG,
    trigger_of,
)

GROUP = "reservations"
ESCAPED_PIPE = "\\|"  # a partition key's `|` would split its Markdown table cell
CLEAN_CHECK = "reservation_clean"


def reservation_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["reservation", name])


def daytime_reservations(settings: Settings) -> list[ReservationSpec]:
    return [r for r in settings.reservations if r.daytime is not None]


def leases_table(rctx: ReservationContext, spec: ReservationSpec, leases: list[Lease]) -> str:
    """The leases as a Markdown table, times in the reservation's timezone."""
    rows = ["| slot | kind | holder | partition | acquired | heartbeat | expires |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {lease.slot} | {lease.kind} | {lease.holder[:8]} | "
             f"{lease.partition.replace('|', ESCAPED_PIPE)} | "
             f"{rctx.shown(spec, lease.acquired_at)} | {rctx.shown(spec, lease.heartbeat_at)} | "
             f"{rctx.shown(spec, lease.expires_at)} |" for lease in leases]
    return "\n".join(rows) if leases else "no leases: every slot is free"


def leases_observation(rctx: ReservationContext, spec: ReservationSpec,
                       leases: list[Lease] | None = None) -> dg.AssetObservation:
    """Who holds the reservation's slots now."""
    leases = rctx.store.leases(spec.name) if leases is None else leases
    return dg.AssetObservation(asset_key=reservation_key(spec.name), metadata={
        "capacity": dg.MetadataValue.int(spec.capacity),
        "leased": dg.MetadataValue.int(len(leases)),
        "holds": dg.MetadataValue.int(sum(lease.kind is LeaseKind.HOLD for lease in leases)),
        "leases": dg.MetadataValue.md(leases_table(rctx, spec, leases)),
        "lease_records": dg.MetadataValue.json([lease.to_dict() for lease in leases]),
    })


def guard_evaluation(rctx: ReservationContext, spec: ReservationSpec, report: GuardReport
                     ) -> dg.AssetCheckEvaluation:
    """`reservation_clean`: green when nothing keeps the reservation from a batch."""
    return dg.AssetCheckEvaluation(
        asset_key=reservation_key(spec.name), check_name=CLEAN_CHECK, passed=report.clean,
        severity=dg.AssetCheckSeverity.ERROR,
        description=("clean" if report.clean else f"dirty: {report.reason}")
        + (f" (after: {'; '.join(report.actions)})" if report.actions else ""),
        metadata={"actions": dg.MetadataValue.json(report.actions),
                  "problems": dg.MetadataValue.json(report.problems),
                  "checked_at": rctx.shown(spec, report.at),
                  "leases": dg.MetadataValue.md(leases_table(rctx, spec, report.leases))})


def hold_metadata(rctx: ReservationContext, report: HoldReport) -> dict[str, object]:
    spec = rctx.spec(report.reservation)
    return {
        "state": report.state, "partition": report.partition, "by": report.by,
        "note": report.note, "holder_run": report.holder, "sandbox_id": report.sandbox_id,
        **{f"endpoint_{name}": dg.MetadataValue.url(url)
           for name, url in report.endpoints.items()},
        "due_down": rctx.shown(spec, report.expires_at) if report.expires_at else "",
        "at": rctx.shown(spec, report.at),
        "problems": dg.MetadataValue.json(report.problems),
    }


def hold_event(rctx: ReservationContext, report: HoldReport) -> dg.AssetMaterialization:
    return dg.AssetMaterialization(asset_key=HELD_SANDBOX, partition=report.reservation,
                                   metadata=hold_metadata(rctx, report))


def guard_events(rctx: ReservationContext, spec: ReservationSpec, report: GuardReport
                 ) -> list[dg.AssetMaterialization | dg.AssetObservation
                           | dg.AssetCheckEvaluation]:
    """What a guard pass records: each hold it took down, the leases now, and the check."""
    return [*(hold_event(rctx, hold) for hold in report.holds if hold.state != UP),
            leases_observation(rctx, spec, report.leases), guard_evaluation(rctx, spec, report)]


def record_guard(instance: dg.DagsterInstance, rctx: ReservationContext, report: GuardReport
                 ) -> None:
    """Records a guard pass outside a run (the nightly schedule, `mlci`, the lifecycle)."""
    for event in guard_events(rctx, rctx.spec(report.reservation), report):
        instance.report_runless_asset_event(event)


def record_admission(context: dg.AssetExecutionContext, admission: Admission) -> None:
    """A lifecycle's guard pass, when it did or found something, and the lease it took."""
    report = admission.report
    if report is None:
        return  # the config is bound to no reservation
    rctx = admission.rctx
    if report.actions or report.problems:
        record_guard(context.instance, rctx, report)
    if admission.lease is not None:
        context.log_event(leases_observation(rctx, rctx.spec(report.reservation)))


def trigger_by(tags: dict[str, str]) -> str:
    """Who asked for a hold's up or down: its schedule by name, else how the run was started
    (a person: `manual`, or what `mlci hold` says)."""
    if SCHEDULE_TAG in tags:
        return f"schedule {tags[SCHEDULE_TAG]}"
    return trigger_of(tags)


class HoldAction(dg.Config):
    action: Literal["up", "down"] = "up"


def reservation_definitions(settings: Settings) -> dict[str, list]:
    """The reservations' assets, checks and jobs (their hold_up and hold_down jobs, which
    schedules.hold_schedules runs); empty without reservations."""
    if not settings.reservations:
        return {"assets": [], "asset_checks": [], "jobs": []}
    specs = {r.name: r for r in settings.reservations}

    leases = [dg.AssetSpec(
        reservation_key(name), group_name=GROUP, kinds={"python"},
        description=f"Reserved capacity '{name}' ({spec.capacity} slot(s) on {spec.provider}): "
                    "each observation lists who leases its slots, at each change.")
        for name, spec in specs.items()]

    @dg.multi_asset_check(specs=[dg.AssetCheckSpec(
        CLEAN_CHECK, asset=reservation_key(name),
        description="The guard: a hold past its down time taken down, dead holders' leases "
                    "broken, leftover sandboxes reaped; red while anything is left.")
        for name in specs], can_subset=True)
    def reservation_clean(context: dg.AssetCheckExecutionContext, mlci: MlciResource):
        rctx = mlci.reservations(context.instance)
        for check in context.selected_asset_check_keys:
            spec = specs[check.asset_key.path[-1]]
            report = guard(rctx, spec.name, batch=False, by="guard")
            *events, evaluation = guard_events(rctx, spec, report)
            for event in events:
                context.instance.report_runless_asset_event(event)
            yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=CLEAN_CHECK,
                                      passed=report.clean, description=evaluation.description,
                                      metadata=evaluation.metadata)

    daytime = daytime_reservations(settings)
    if not daytime:
        return {"assets": leases, "asset_checks": [reservation_clean], "jobs": []}
    held = held_sandbox_asset(dg.StaticPartitionsDefinition([r.name for r in daytime]))
    up_job = dg.define_asset_job(HOLD_UP_JOB, selection=[held],
                                 config={"ops": {HELD_SANDBOX: {"config": {"action": "up"}}}},
                                 description="Stand a reservation's daytime deployment up.")
    down_job = dg.define_asset_job(HOLD_DOWN_JOB, selection=[held],
                                   config={"ops": {HELD_SANDBOX: {"config": {"action": "down"}}}},
                                   description="Take a reservation's daytime deployment down.")
    return {"assets": [*leases, held], "asset_checks": [reservation_clean],
            "jobs": [up_job, down_job]}


def held_sandbox_asset(partitions: dg.StaticPartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(name=HELD_SANDBOX, partitions_def=partitions, group_name=GROUP, kinds={"python"},
              description="A reservation's daytime deployment for people: each materialization "
                          "is an up (its endpoints) or a down. No results, no history.")
    def held_sandbox(context: dg.AssetExecutionContext, config: HoldAction,
                     mlci: MlciResource) -> dg.MaterializeResult:
        rctx = mlci.reservations(context.instance)
        name = context.partition_key
        by = trigger_by(dict(context.run.tags))
        report = (hold_up(rctx, name, context.run.run_id, by) if config.action == "up"
                  else hold_down(rctx, name, by))
        context.log_event(leases_observation(rctx, rctx.spec(name)))
        if not report.ok:
            raise dg.Failure(description=f"hold {config.action} of {name}: "
                             + "; ".join(report.problems),
                             metadata={"details": dg.MetadataValue.json(report.details)})
        context.log.info(f"{name}: {report.state}, {report.note}")
        return dg.MaterializeResult(metadata=hold_metadata(rctx, report))

    return held_sandbox
