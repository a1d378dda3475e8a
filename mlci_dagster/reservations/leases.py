"""Leases on a reservation's slots: who holds each (a test run, or a daytime hold), since when,
its last heartbeat and when it expires, in a small table of the Dagster instance's own database.

A table, not Dagster's concurrency pools: a pool's slot is claimed by an op and freed when that
step ends, while a daytime hold keeps its slot from the morning's run to the evening's, across
runs; a pool is fixed per op, while a reservation depends on the partition; and a pool slot has
no expiry or heartbeat to tell a dead holder by. The table lives where the runs do (SQLite on one
machine, PostgreSQL when scaled out), so every run pod, the daemon and `mlci` see the same
leases. Each slot is a primary key: taking one is a single INSERT, atomic on both databases.

Dagster-free: it is handed a way to connect (see compat.instance_connection).
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

Connect = Callable[[], contextlib.AbstractContextManager[sa.Connection]]

METADATA = sa.MetaData()
LEASES = sa.Table(
    "mlci_leases", METADATA,
    sa.Column("reservation", sa.String(63), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("partition_key", sa.String(255), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)


class LeaseKind(enum.StrEnum):
    """What holds a slot: a test run while its lifecycle lasts, or a daytime hold (a deployment
    for people) from its morning up to its evening down."""

    RUN = "run"
    HOLD = "hold"


@dataclass(frozen=True)
class Lease:
    reservation: str
    slot: int
    kind: LeaseKind
    holder: str  # the run id: the lifecycle's, or the run that stood the hold up
    partition: str  # the config|engine whose sandbox holds the slot
    acquired_at: float
    heartbeat_at: float
    expires_at: float
    detail: dict[str, Any] = field(default_factory=dict)  # a hold's sandbox and endpoints

    def to_dict(self) -> dict[str, Any]:
        return {"reservation": self.reservation, "slot": self.slot, "kind": str(self.kind),
                "holder": self.holder, "partition": self.partition,
                "acquired_at": self.acquired_at, "heartbeat_at": self.heartbeat_at,
                "expires_at": self.expires_at, "detail": self.detail}


def _lease(row: sa.Row) -> Lease:
    return Lease(row.reservation, row.slot, LeaseKind(row.kind), row.holder, row.partition_key,
                 row.acquired_at, row.heartbeat_at, row.expires_at, json.loads(row.detail))


class LeaseError(RuntimeError):
    """The lease table could not be read or written (the instance's database is unreachable)."""


class TableStore:
    """Tables of the instance's database, reached through `connect` (a context manager yielding
    a connection): created on first use; a database error is raised as `error`, naming
    `what`. An IntegrityError passes as it is (a slot taken since it was read)."""

    tables: tuple[sa.Table, ...] = ()
    what = "the tables"
    error: type[Exception] = RuntimeError

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._created = False

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        try:
            connection = self._connect()
        except Exception as exc:  # noqa: BLE001 (no database to keep them in: say where)
            raise self.error(f"{self.what} cannot be reached: {exc}") from exc
        try:
            with connection as conn:
                if not self._created:
                    for table in self.tables:
                        conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
                    self._created = True
                yield conn
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise self.error(f"{self.what}: {exc}") from exc


class LeaseStore(TableStore):
    """The lease table."""

    tables = (LEASES,)
    what = "the lease table mlci_leases"
    error = LeaseError

    def leases(self, reservation: str | None = None) -> list[Lease]:
        """Every lease (of `reservation`), by reservation and slot."""
        query = sa.select(LEASES).order_by(LEASES.c.reservation, LEASES.c.slot)
        if reservation is not None:
            query = query.where(LEASES.c.reservation == reservation)
        with self._connection() as conn:
            return [_lease(row) for row in conn.execute(query)]

    def held_by(self, reservation: str, holder: str) -> Lease | None:
        return next((lease for lease in self.leases(reservation) if lease.holder == holder),
                    None)

    def acquire(self, reservation: str, capacity: int, *, kind: LeaseKind, holder: str,
                partition: str, now: float, expires_at: float,
                detail: dict[str, Any] | None = None) -> Lease | None:
        """A free slot of the reservation for `holder` (its own lease if it holds one already);
        None when all `capacity` slots are held. Two holders never get one slot: each slot is a
        primary key, and a taken one fails the INSERT."""
        held = self.held_by(reservation, holder)
        if held is not None:
            return held
        taken = {lease.slot for lease in self.leases(reservation)}
        for slot in (s for s in range(capacity) if s not in taken):
            lease = Lease(reservation, slot, kind, holder, partition, now, now, expires_at,
                          dict(detail or {}))
            try:
                with self._connection() as conn:
                    conn.execute(sa.insert(LEASES).values(
                        reservation=reservation, slot=slot, kind=str(kind), holder=holder,
                        partition_key=partition, acquired_at=now, heartbeat_at=now,
                        expires_at=expires_at, detail=json.dumps(lease.detail)))
            except IntegrityError:
                continue  # taken since we looked: try the next
            return lease
        return None

    def renew(self, reservation: str, holder: str, now: float, expires_at: float,
              detail: dict[str, Any] | None = None) -> bool:
        """The holder's heartbeat: its lease now expires at `expires_at`. False when it holds
        none (it was broken)."""
        values: dict[str, Any] = {"heartbeat_at": now, "expires_at": expires_at}
        if detail is not None:
            values["detail"] = json.dumps(detail)
        with self._connection() as conn:
            return conn.execute(sa.update(LEASES).where(
                LEASES.c.reservation == reservation, LEASES.c.holder == holder
            ).values(**values)).rowcount > 0

    def release(self, reservation: str, holder: str) -> bool:
        """Frees the holder's slot; False when it held none. Idempotent."""
        with self._connection() as conn:
            return conn.execute(sa.delete(LEASES).where(
                LEASES.c.reservation == reservation, LEASES.c.holder == holder)).rowcount > 0

    def take_back(self, lease: Lease) -> bool:
        """Frees exactly this lease, not one taken on the same slot since it was read."""
        with self._connection() as conn:
            return conn.execute(sa.delete(LEASES).where(
                LEASES.c.reservation == lease.reservation, LEASES.c.slot == lease.slot,
                LEASES.c.holder == lease.holder,
                LEASES.c.acquired_at == lease.acquired_at)).rowcount > 0


def holds_by_reservation(store: LeaseStore) -> dict[str, int]:
    """How many slots of each reservation its daytime holds take (not counting runs)."""
    counts: dict[str, int] = {}
    for lease in store.leases():
        if lease.kind is LeaseKind.HOLD:
            counts[lease.reservation] = counts.get(lease.reservation, 0) + 1
    return counts
