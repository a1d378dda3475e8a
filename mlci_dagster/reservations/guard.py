"""The guard: puts a reservation in order before test runs take it, and says whether it is clean.

Before a batch (the nightly schedule) and before every run on a reservation it tears down a
daytime hold held past its down time, breaks the leases of dead holders (a run that is over, or
whose heartbeat stopped) and reaps sandboxes left on the reservation by runs that are over. A
reservation still held or dirty after that is refused: its runs are skipped with the reason,
while other reservations' runs go ahead. The janitor does the same, less eagerly, between
batches (see `tend`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlci_dagster.common import clock
from mlci_dagster.providers.base import providers_for
from mlci_dagster.providers.janitor import Verdict, registry_teardown_timeout, sweep
from mlci_dagster.reservations.context import HOLD_GRACE_S, HOLD_UP, ReservationContext
from mlci_dagster.reservations.holds import HoldReport, end_unfinished, hold_down, hold_lease
from mlci_dagster.reservations.leases import Lease, LeaseError, LeaseKind


@dataclass
class GuardReport:
    """What the guard did to one reservation, and what still keeps it from a batch."""

    reservation: str
    at: float
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    holds: list[HoldReport] = field(default_factory=list)  # holds it took down

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"reservation": self.reservation, "at": self.at, "clean": self.clean,
                "actions": self.actions, "problems": self.problems,
                "leases": [lease.to_dict() for lease in self.leases],
                "holds": [hold.to_dict() for hold in self.holds]}


def why_break(lease: Lease, now: float, run_over: Any) -> str:
    """Why a lease's holder is dead: a run that is over or stopped its heartbeat, or a hold
    whose run ended before its sandbox was up. A hold that is up is never broken: it is taken
    down (end_expired_hold)."""
    if lease.kind is LeaseKind.HOLD:
        if lease.detail.get("state") != HOLD_UP and run_over(lease.holder):
            return f"its run {lease.holder[:8]} ended before the hold was up"
        return ""
    if now >= lease.expires_at:
        return f"no heartbeat for {now - lease.heartbeat_at:.0f}s"
    if run_over(lease.holder):
        return f"run {lease.holder[:8]} is over"
    return ""


def break_dead_leases(rctx: ReservationContext, name: str, now: float, report: GuardReport
                      ) -> None:
    for lease in rctx.store.leases(name):
        why = why_break(lease, now, rctx.run_over)
        if not why:
            continue
        if lease.kind is LeaseKind.HOLD:
            left = end_unfinished(rctx, lease)
            report.problems.extend(left)
            if not left:
                report.actions.append(f"ended the unfinished hold of run {lease.holder[:8]}: "
                                      f"{why}")
        elif rctx.store.take_back(lease):
            report.actions.append(f"broke the lease of run {lease.holder[:8]} on slot "
                                  f"{lease.slot} ({lease.partition}): {why}")


def end_expired_hold(rctx: ReservationContext, name: str, now: float, grace_s: float, by: str,
                     report: GuardReport) -> None:
    """Takes down the reservation's hold if it is up `grace_s` past its down time."""
    lease = hold_lease(rctx, name)
    if lease is None or lease.detail.get("state") != HOLD_UP or \
            now < lease.expires_at + grace_s:
        return
    spec = rctx.spec(name)
    down = hold_down(rctx, name, by, reason=f"held past its down time "
                     f"{rctx.shown(spec, lease.expires_at)}: torn down by the {by}")
    report.holds.append(down)
    if down.ok:
        report.actions.append(f"tore down the daytime deployment {down.partition} "
                              f"({down.sandbox_id or 'no sandbox left'}), held past its down "
                              f"time {rctx.shown(spec, lease.expires_at)}")
    else:
        report.problems.extend(f"the daytime deployment {down.partition} could not be torn "
                               f"down: {problem}" for problem in down.problems)


def sweep_reservation(rctx: ReservationContext, name: str, now: float, report: GuardReport
                      ) -> list[Verdict]:
    """Reaps sandboxes of the reservation's configs whose run is over (a hold's kept)."""
    bound = {c.name: c.config.sandbox for c in rctx.registry.configs.values()
             if c.config.sandbox.reservation == name}
    if not bound:
        return []
    providers = providers_for(list(bound.values()), rctx.home, rctx.registry.secret_names,
                              rctx.registry.root)
    verdicts = [v for v in sweep(providers, rctx.run_over, now=now, keep=rctx.keep_held(),
                                 teardown_timeout=registry_teardown_timeout(rctx.registry),
                                 select=lambda handle: handle.config in bound) if v.reason]
    for verdict in verdicts:
        if verdict.report and verdict.report.clean:
            report.actions.append(f"reaped sandbox {verdict.sandbox_id}: {verdict.reason}")
        else:
            left = f": {verdict.report.left_behind()}" if verdict.report else ""
            report.problems.append(f"sandbox {verdict.sandbox_id} left on the reservation "
                                   f"({verdict.reason}) could not be destroyed{left}")
    return verdicts


def guard(rctx: ReservationContext, name: str, *, batch: bool, by: str = "guard"
          ) -> GuardReport:
    """Puts the reservation in order; `batch`: before a batch, so a hold past its down time is
    taken down at once and any hold still up keeps the reservation from the batch."""
    now = clock.now()
    report = GuardReport(name, now)
    try:
        end_expired_hold(rctx, name, now, 0.0 if batch else HOLD_GRACE_S, by, report)
        break_dead_leases(rctx, name, now, report)
        sweep_reservation(rctx, name, now, report)
        report.leases = rctx.store.leases(name)
    except LeaseError as exc:  # fail closed: nothing is known about who holds what
        report.problems.append(str(exc))
        return report
    held = hold_lease(rctx, name)
    if batch and held is not None:
        report.problems.append(f"still held: the daytime deployment {held.partition} of run "
                               f"{held.holder[:8]} {hold_due(rctx, name, held, now)}")
    return report


def hold_due(rctx: ReservationContext, name: str, lease: Lease, now: float) -> str:
    """When a hold is due down, true either side of that time: `is up until 19:00 EDT`, or
    once it has passed (its run still standing it up, or its take-down failed) `was due down
    at 19:00 EDT, 3h ago`."""
    from mlci_dagster.history.render import age  # here: it brings pandas, the guard need not

    due = rctx.shown(rctx.spec(name), lease.expires_at)
    if now < lease.expires_at:
        return f"is up until {due}"
    return f"was due down at {due}, {age(lease.expires_at, now)}"


def tend(rctx: ReservationContext, by: str = "janitor") -> list[GuardReport]:
    """The janitor's pass over every reservation: holds past their down time by more than the
    grace are taken down, dead holders' leases broken. Sandboxes are its own sweep's."""
    reports = []
    for spec in rctx.registry.settings.reservations:
        now = clock.now()
        report = GuardReport(spec.name, now)
        end_expired_hold(rctx, spec.name, now, HOLD_GRACE_S, by, report)
        break_dead_leases(rctx, spec.name, now, report)
        report.leases = rctx.store.leases(spec.name)
        reports.append(report)
    return reports
