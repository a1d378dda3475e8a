"""What `mlci leases` and `mlci hold` print: each reservation's slots, who leases them and in
what state, times in the reservation's own timezone."""

from __future__ import annotations

from typing import Any

from mlci_dagster.common import clock
from mlci_dagster.history.render import table
from mlci_dagster.registry.reservations import ReservationSpec
from mlci_dagster.reservations.context import HOLD_UP, ReservationContext
from mlci_dagster.reservations.guard import why_break
from mlci_dagster.reservations.holds import hold_lease
from mlci_dagster.reservations.leases import Lease, LeaseKind


def lease_state(rctx: ReservationContext, lease: Lease, now: float) -> str:
    """`live`, `dead: <why>` (the janitor breaks it), `up`, `up, past its down time`, or
    `starting` for a hold."""
    if lease.kind is LeaseKind.HOLD:
        state = lease.detail.get("state", "")
        if state == HOLD_UP and now >= lease.expires_at:
            return "up, past its down time"
        dead = why_break(lease, now, rctx.run_over)
        return f"dead: {dead}" if dead else state
    dead = why_break(lease, now, rctx.run_over)
    return f"dead: {dead}" if dead else "live"


def daytime_text(spec: ReservationSpec) -> str:
    if spec.daytime is None:
        return "no daytime intent"
    return (f"daytime {spec.daytime.intent} {spec.daytime.up}-{spec.daytime.down} "
            f"{','.join(spec.daytime.weekdays)}")


def lease_rows(rctx: ReservationContext) -> list[dict[str, Any]]:
    """Every reservation with its leases and their states, for `--json`."""
    now = clock.now()
    leases = rctx.store.leases()
    return [{"reservation": spec.name, "provider": spec.provider, "account": spec.account,
             "capacity": spec.capacity, "timezone": spec.timezone,
             "daytime": spec.daytime.model_dump() if spec.daytime else None,
             "leases": [{**lease.to_dict(), "state": lease_state(rctx, lease, now)}
                        for lease in leases if lease.reservation == spec.name]}
            for spec in rctx.registry.settings.reservations]


def leases_text(rctx: ReservationContext) -> str:
    now = clock.now()
    leases = rctx.store.leases()
    blocks = []
    for spec in rctx.registry.settings.reservations:
        mine = [lease for lease in leases if lease.reservation == spec.name]
        head = (f"{spec.name}  {spec.provider}  {len(mine)}/{spec.capacity} leased  "
                f"{spec.timezone}  {daytime_text(spec)}")
        if not mine:
            blocks.append(f"{head}\n  every slot free")
            continue
        rows = [["SLOT", "KIND", "HOLDER", "PARTITION", "ACQUIRED", "HEARTBEAT", "EXPIRES",
                 "STATE"]]
        rows += [[str(lease.slot), str(lease.kind), lease.holder[:8], lease.partition,
                  rctx.shown(spec, lease.acquired_at), rctx.shown(spec, lease.heartbeat_at),
                  rctx.shown(spec, lease.expires_at), lease_state(rctx, lease, now)]
                 for lease in mine]
        blocks.append(head + "\n" + "\n".join(f"  {line}" for line in table(rows).splitlines()))
    return "\n\n".join(blocks)


def hold_text(rctx: ReservationContext, name: str) -> str:
    """The hold's state after `mlci hold up|down`: up with its endpoints, or down."""
    spec = rctx.spec(name)
    lease = hold_lease(rctx, name)
    if lease is None:
        return f"{name}: down"
    if lease.detail.get("state") != HOLD_UP:
        return f"{name}: being stood up by run {lease.holder[:8]} ({lease.partition})"
    lines = [f"{name}: up: {lease.partition} (sandbox {lease.detail.get('sandbox_id', '?')}), "
             f"due down {rctx.shown(spec, lease.expires_at)}"]
    lines += [f"  {service}: {url}"
              for service, url in sorted(lease.detail.get("endpoints", {}).items())]
    return "\n".join(lines)
