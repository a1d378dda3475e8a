"""Daytime holds: a reservation's intent config stood up for people in the morning, with no
teardown, holding a lease slot until it is taken down in the evening.

A hold is no test: it writes no results and never enters the history. Its lease names the run
that stood it up, and that run id is on its sandbox, so the janitor keeps the sandbox while the
hold is up. Up and down are idempotent; a failed up leaves nothing (its lease released, its
sandbox destroyed); a down that cannot destroy everything keeps the lease, so the reservation
stays dirty until the guard succeeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mlci_dagster.common import clock
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.registry.reservations import ReservationSpec
from mlci_dagster.reservations.context import (
    HELD_SANDBOX_MARGIN_S,
    HOLD_STARTING,
    HOLD_UP,
    ReservationContext,
)
from mlci_dagster.reservations.leases import Lease, LeaseKind
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.stages.sandbox import start_sandbox
from mlci_dagster.vocabulary import Stage, partition_key

UP, DOWN = "up", "down"


@dataclass
class HoldReport:
    """What one up or down did: the state the hold is in after it, and why."""

    reservation: str
    state: str  # UP or DOWN: what the hold is after this
    partition: str
    by: str  # who asked: the schedule, a person (manual), the guard, the janitor
    at: float
    note: str = ""  # what happened, in one sentence
    problems: list[str] = field(default_factory=list)
    holder: str = ""  # the run that stood it up
    sandbox_id: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)
    expires_at: float = 0.0  # when it is due down
    slot: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def intent_partition(rctx: ReservationContext, spec: ReservationSpec) -> tuple[str, str]:
    """(config, engine) of the reservation's daytime intent: its engine, else the config's
    first."""
    if spec.daytime is None:
        raise KeyError(f"reservation '{spec.name}' has no daytime intent (expected `daytime:` "
                       "under it in mlci.yaml)")
    config = spec.daytime.config
    loaded = rctx.registry.configs[config]
    return config, spec.daytime.engine or rctx.registry.engines_for(loaded.config)[0]


def hold_lease(rctx: ReservationContext, name: str) -> Lease | None:
    return next((lease for lease in rctx.store.leases(name) if lease.kind is LeaseKind.HOLD),
                None)


def _context(rctx: ReservationContext, spec: ReservationSpec, run_id: str,
             ttl_s: float | None = None) -> LifecycleContext:
    config, engine = intent_partition(rctx, spec)
    return LifecycleContext.create(rctx.registry, config, engine, run_id, rctx.home,
                                   sandbox_ttl_s=ttl_s)


def held_sandboxes(ctx: LifecycleContext, holder: str) -> list[SandboxHandle]:
    """The sandboxes a hold's run stood up that the provider still has."""
    return [h for h in ctx.provider.list_live() if h.run_id == holder]


def hold_up(rctx: ReservationContext, name: str, run_id: str, by: str) -> HoldReport:
    """Stands the reservation's intent config up for people, with no teardown, until its next
    down time; or reports the hold already up. A failure leaves nothing behind."""
    spec = rctx.spec(name)
    config, engine = intent_partition(rctx, spec)
    partition = partition_key(config, engine)
    now = clock.now()
    report = HoldReport(name, DOWN, partition, by, now)
    existing = hold_lease(rctx, name)
    if existing is not None and existing.detail.get("state") == HOLD_UP:
        alive = held_sandboxes(_context(rctx, spec, existing.holder), existing.holder)
        if alive:
            return _from_lease(report, existing, UP,
                               note=f"already up since {rctx.shown(spec, existing.acquired_at)}")
        rctx.store.take_back(existing)  # its sandbox is gone: stand a new one up
    elif existing is not None and existing.holder != run_id:
        if not rctx.run_over(existing.holder):
            report.problems.append(f"being stood up by run {existing.holder[:8]} since "
                                   f"{rctx.shown(spec, existing.acquired_at)}")
            return report
        end_unfinished(rctx, existing)
    until = rctx.hold_until(spec, now)
    lease = rctx.store.acquire(name, spec.capacity, kind=LeaseKind.HOLD, holder=run_id,
                               partition=partition, now=now, expires_at=until,
                               detail={"state": HOLD_STARTING, "by": by})
    if lease is None:
        report.problems.append(rctx.full(spec))
        return report
    ctx = _context(rctx, spec, run_id, ttl_s=until - now + HELD_SANDBOX_MARGIN_S)
    image = build_image(ctx)
    sandbox = start_sandbox(ctx, image)
    handle = sandbox.details.handle
    if not sandbox.passed or handle is None:
        failed = sandbox if image.passed else image
        for leftover in held_sandboxes(ctx, run_id):
            ctx.provider.destroy(leftover, timeout_s=ctx.config.timeouts.teardown_s)
        rctx.store.release(name, run_id)
        report.problems.append(f"{failed.stage} {failed.status}: {failed.error_summary}")
        report.details = {str(Stage.IMAGE): image.to_dict(), str(Stage.SANDBOX): sandbox.to_dict()}
        return report
    detail = {"state": HOLD_UP, "by": by, "sandbox_id": handle.sandbox_id,
              "endpoints": dict(handle.endpoints), "provider": handle.provider,
              "image_digest": image.details.digest}
    rctx.store.renew(name, run_id, clock.now(), until, detail)
    up = rctx.store.held_by(name, run_id) or lease
    return _from_lease(report, up, UP, note=f"up until {rctx.shown(spec, until)}",
                       probes=sandbox.details.probes)


def end_unfinished(rctx: ReservationContext, lease: Lease) -> list[str]:
    """Destroys what a hold's run left when it ended before its sandbox was up, then frees its
    slot; the problems, if anything is left (the slot then stays taken)."""
    ctx = _context(rctx, rctx.spec(lease.reservation), lease.holder)
    problems = []
    for handle in held_sandboxes(ctx, lease.holder):
        verified = ctx.provider.destroy(handle, timeout_s=ctx.config.timeouts.teardown_s)
        if not verified.clean:
            problems.append(f"sandbox {handle.sandbox_id} not fully destroyed: "
                            f"{verified.left_behind()}")
    if not problems:
        rctx.store.take_back(lease)
    return problems


def _from_lease(report: HoldReport, lease: Lease, state: str, note: str, **details: Any
                ) -> HoldReport:
    report.state, report.note, report.holder = state, note, lease.holder
    report.sandbox_id = lease.detail.get("sandbox_id", "")
    report.endpoints = dict(lease.detail.get("endpoints", {}))
    report.expires_at, report.slot = lease.expires_at, lease.slot
    report.details = details
    return report


def hold_down(rctx: ReservationContext, name: str, by: str, reason: str = "") -> HoldReport:
    """Tears the reservation's daytime deployment down and releases its lease; idempotent. The
    lease stays while anything is left, so the reservation stays dirty."""
    spec = rctx.spec(name)
    config, engine = intent_partition(rctx, spec)
    now = clock.now()
    report = HoldReport(name, DOWN, partition_key(config, engine), by, now)
    lease = hold_lease(rctx, name)
    if lease is None:
        report.note = "already down"
        return report
    ctx = _context(rctx, spec, lease.holder)
    destroyed = []
    for handle in held_sandboxes(ctx, lease.holder):
        verified = ctx.provider.destroy(handle, timeout_s=ctx.config.timeouts.teardown_s)
        destroyed.append({"sandbox_id": handle.sandbox_id, **verified.to_dict()})
        if not verified.clean:
            report.problems.append(f"sandbox {handle.sandbox_id} not fully destroyed: "
                                   f"{verified.left_behind()}")
    _from_lease(report, lease, DOWN if not report.problems else UP,
                note=reason or "taken down", destroyed=destroyed)
    if not report.problems:
        rctx.store.take_back(lease)
    return report
