"""What every reservation operation needs: the registry, the harness home, the lease table, and
how to tell that a run is over (a question the Dagster layer answers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.registry import Registry, localtime
from mlci_dagster.registry.reservations import ReservationSpec
from mlci_dagster.reservations.leases import Lease, LeaseError, LeaseKind, LeaseStore

# A run's lease lives this long past its last heartbeat; the heartbeat comes far more often.
RUN_LEASE_TTL_S = 120.0
HEARTBEAT_S = 15.0
# How long after its down time the janitor waits before it ends a hold itself (the evening
# schedule's run may be on its way); the pre-batch guard does not wait.
HOLD_GRACE_S = 600.0
# A held sandbox expires after its lease would be ended by the janitor, never before.
HELD_SANDBOX_MARGIN_S = 2 * HOLD_GRACE_S

HOLD_UP = "up"  # a hold lease's detail["state"] once its sandbox is ready
HOLD_STARTING = "starting"  # before that: a crash then leaves nothing worth keeping


@dataclass
class ReservationContext:
    registry: Registry
    home: Path
    store: LeaseStore
    run_over: Callable[[str], bool]

    def spec(self, name: str) -> ReservationSpec:
        declared = {r.name: r for r in self.registry.settings.reservations}
        if name not in declared:
            raise KeyError(f"unknown reservation '{name}' (expected one of: "
                           f"{', '.join(declared) or 'none declared in mlci.yaml'})")
        return declared[name]

    def reservation_of(self, config: str) -> ReservationSpec | None:
        """The reservation the config's sandbox binds to, if any."""
        name = self.registry.configs[config].config.sandbox.reservation
        return self.spec(name) if name else None

    def hold_until(self, spec: ReservationSpec, now: float) -> float:
        """When a hold stood up at `now` must be down: its next scheduled down, and never later
        than the next nightly start."""
        nightly = self.registry.settings.nightly.next_start(now)
        return min(spec.next_down(now), nightly) if spec.daytime else nightly

    def full(self, spec: ReservationSpec) -> str:
        """Why no slot of the reservation is free: who holds each."""
        holders = ", ".join(f"{lease.kind} {lease.holder[:8]} ({lease.partition})"
                            for lease in self.store.leases(spec.name))
        return f"reservation {spec.name} is full: its {spec.capacity} slot(s) are leased " \
               f"({holders})"

    def shown(self, spec: ReservationSpec, moment: float) -> str:
        return localtime.shown(moment, localtime.zone(spec.timezone))

    def held_runs(self) -> dict[str, Lease]:
        """The hold leases whose sandbox is up, by the run that stood it up."""
        return {lease.holder: lease for lease in self.store.leases()
                if lease.kind is LeaseKind.HOLD and lease.detail.get("state") == HOLD_UP}

    def keep_held(self) -> Callable[[SandboxHandle], str]:
        """For the janitor and every run's cleanup: why a sandbox is kept although its run is
        over (it is a daytime hold's, up until its down time), or "". With the lease table out
        of reach, every sandbox of a reservation's config is kept (unless it expired): none is
        known not to be held."""
        try:
            held = self.held_runs()
        except LeaseError:
            reserved = {c.name for c in self.registry.configs.values()
                        if c.config.sandbox.reservation}
            return lambda handle: "holds unknown" if handle.config in reserved else ""

        def keep(handle: SandboxHandle) -> str:
            lease = held.get(handle.run_id)
            return f"the daytime hold of {lease.reservation}" if lease else ""

        return keep
