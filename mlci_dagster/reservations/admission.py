"""Admission of one test run to its reservation: the guard first, then a lease slot held with a
heartbeat for as long as the lifecycle lasts, or the reason the run is refused.

Runs wait for a slot in Dagster's run queue (each reservation is a pool whose limit is its
capacity less its holds, see run_coordinator.py), so a slot is free when a run gets here; one
that finds none was started outside the queue, or raced a hold, and is refused rather than
waiting: it fails closed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import TracebackType

from mlci_dagster.common import clock
from mlci_dagster.reservations.context import HEARTBEAT_S, RUN_LEASE_TTL_S, ReservationContext
from mlci_dagster.reservations.guard import GuardReport, guard
from mlci_dagster.reservations.leases import Lease, LeaseError, LeaseKind, LeaseStore


class Heartbeat:
    """Renews a lease every `every_s` in a thread of its own until stopped."""

    def __init__(self, store: LeaseStore, lease: Lease, every_s: float = HEARTBEAT_S,
                 ttl_s: float = RUN_LEASE_TTL_S) -> None:
        self.store, self.lease, self.every_s, self.ttl_s = store, lease, every_s, ttl_s
        self.lost = False  # the lease was broken under us (the janitor judged us dead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlci-lease-heartbeat",
                                        daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            now = clock.now()
            try:
                renewed = self.store.renew(self.lease.reservation, self.lease.holder, now,
                                           now + self.ttl_s)
            except LeaseError:
                continue  # the database is away for a moment: the lease outlives a few misses
            self.lost |= not renewed


@dataclass
class Admission:
    """A context manager around one lifecycle: `refusal` is None while the run holds its lease
    (released when the lifecycle ends), else why it may not start."""

    rctx: ReservationContext
    config: str
    partition: str
    run_id: str
    refusal: str | None = None
    report: GuardReport | None = None
    lease: Lease | None = None
    _heartbeat: Heartbeat | None = field(default=None, repr=False)

    def __enter__(self) -> Admission:
        spec = self.rctx.reservation_of(self.config)
        if spec is None:
            return self
        self.report = guard(self.rctx, spec.name, batch=False)
        if not self.report.clean:
            self.refusal = f"reservation {spec.name} is dirty: {self.report.reason}"
            return self
        now = clock.now()
        try:
            self.lease = self.rctx.store.acquire(
                spec.name, spec.capacity, kind=LeaseKind.RUN, holder=self.run_id,
                partition=self.partition, now=now, expires_at=now + RUN_LEASE_TTL_S)
        except LeaseError as exc:
            self.refusal = f"reservation {spec.name}: {exc}"
            return self
        if self.lease is None:
            self.refusal = (f"{self.rctx.full(spec)}; runs wait for a slot in Dagster's queue, "
                            "and this one was started outside it")
            return self
        self._heartbeat = Heartbeat(self.rctx.store, self.lease).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        # Interrupted, the sandbox may still be up: the run's last cleanup releases the lease
        # after reaping it (MlciResource.teardown_after_execution), or the janitor does.
        if self.lease is not None and kind is None:
            self.rctx.store.release(self.lease.reservation, self.run_id)
