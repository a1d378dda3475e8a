"""Admission: whether one more run of a pool may go in progress. The one rule, for every path
that starts lifecycle runs: a pool never has more runs in progress, plus runs being admitted,
than its limit less its daytime holds.

Two paths start runs, and both keep to it:
- Dagster's run queue, which the daemon dequeues (the UI's buttons, backfills, schedules,
  sensors): its tag concurrency limits count the runs in progress (STARTING, STARTED,
  CANCELING) with a pool's tag, and the run coordinator lowers each pool's limit by its holds
  and by the admissions in flight below (`launch/coordinator.py`).
- `mlci run`, which runs each partition in a worker process of its own with no daemon (the
  embedded default has none, and a worker's run is created by the worker, NOT_STARTED, which
  the queue does not count, for the seconds a worker takes to boot). It admits a run here: it
  claims a slot in the instance's database first, then counts.

The daemon decides on a snapshot: it reads its limits at the start of a dequeue iteration, then
launches. A claim made after that read is unseen by that iteration, so a claim waits until the
daemon has begun an iteration after it (the coordinator counts its iterations here, in the
daemon's dequeue thread only): every later iteration sees the claim, and every launch of an
earlier one is in progress by then, counted. Then the slot is counted and kept, or given back.
A claim lasts until its run is in progress (then its pool tag counts it) or CLAIM_TTL_S, which
outlives any admission of a live process. With no daemon dequeuing (no iteration for
QUEUE_STALE_S), nothing is waited for.

Why not Dagster's own queue for `mlci run` as well: without a daemon nothing would dequeue, and
the run launcher that would then start the run cannot hand it to `mlci run`'s worker, which
Ctrl-C, the parent's death and a lost worker rely on (runner.py). Why not Dagster's op
concurrency pools: a pool's slot is claimed by a step of a run already in progress, and the
pool here depends on the partition.

Dagster-free: it is handed a way to connect (see compat.instance_connection), as the lease
table is; the claims live beside the leases, in the instance's own database (SQLite on one
machine, PostgreSQL when scaled out), so every `mlci run` and the daemon see them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

from mlci_dagster.reservations.leases import Connect, TableStore

CLAIM_TTL_S = 180.0  # a claim older than this belongs to a process that is gone
QUEUE_STALE_S = 30.0  # no dequeue iteration for this long: no daemon is dequeuing
RUN_QUEUE = "run_queue"

METADATA = sa.MetaData()
CLAIMS = sa.Table(
    "mlci_admissions", METADATA,
    sa.Column("holder", sa.String(64), primary_key=True),  # the run id being admitted
    sa.Column("pool", sa.String(63), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)
ITERATIONS = sa.Table(
    "mlci_queue_iterations", METADATA,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("iteration", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


class AdmissionError(RuntimeError):
    """The admission tables could not be read or written (the instance's database)."""


def free_slots(limit: int, in_progress: int, holds: int = 0, claims: int = 0) -> int:
    """The rule: how many more runs of a pool may go in progress."""
    return max(0, limit - holds - claims - in_progress)


class AdmissionStore(TableStore):
    """The claims of runs being admitted, and the run queue's iteration count."""

    tables = (CLAIMS, ITERATIONS)
    what = "the admission tables"
    error = AdmissionError

    def __init__(self, connect: Connect, clock: Callable[[], float] = time.time) -> None:
        super().__init__(connect)
        self._clock = clock

    # --- claims ------------------------------------------------------------------------

    def claim(self, pool: str, holder: str) -> None:
        """`holder` (a run id) is being admitted to `pool`: counted from now on. Stale claims
        are dropped here, so the readers (the daemon, the webserver) never write."""
        now = self._clock()
        with self._connection() as conn:
            conn.execute(sa.delete(CLAIMS).where(sa.or_(
                CLAIMS.c.holder == holder, CLAIMS.c.claimed_at < now - CLAIM_TTL_S)))
            conn.execute(sa.insert(CLAIMS).values(holder=holder, pool=pool, claimed_at=now))

    def release(self, holder: str) -> None:
        """Idempotent."""
        with self._connection() as conn:
            conn.execute(sa.delete(CLAIMS).where(CLAIMS.c.holder == holder))

    def claims(self, besides: str | None = None) -> dict[str, int]:
        """The live claims per pool (but `besides`'s): stale ones are not counted."""
        with self._connection() as conn:
            rows = conn.execute(sa.select(CLAIMS.c.pool, sa.func.count()).where(
                CLAIMS.c.holder != (besides or ""),
                CLAIMS.c.claimed_at >= self._clock() - CLAIM_TTL_S).group_by(CLAIMS.c.pool)).all()
        return {pool: int(count) for pool, count in rows}

    # --- the run queue's iterations ----------------------------------------------------

    def count_queue_iteration(self) -> None:
        """The daemon begins a dequeue iteration (its limits are read right after)."""
        now = self._clock()
        with self._connection() as conn:
            bumped = conn.execute(sa.update(ITERATIONS).where(ITERATIONS.c.name == RUN_QUEUE)
                                  .values(iteration=ITERATIONS.c.iteration + 1, at=now))
            if bumped.rowcount == 0:
                conn.execute(sa.insert(ITERATIONS).values(name=RUN_QUEUE, iteration=1, at=now))

    def queue_iteration(self) -> tuple[int, float] | None:
        """The run queue's last iteration: its number and when it began; None: never."""
        with self._connection() as conn:
            row = conn.execute(sa.select(ITERATIONS.c.iteration, ITERATIONS.c.at).where(
                ITERATIONS.c.name == RUN_QUEUE)).first()
        return (int(row.iteration), float(row.at)) if row else None

    def wait_for_queue(self, sleep: Callable[[float], None] = time.sleep,
                       poll_s: float = 0.2) -> bool:
        """Returns once a dequeue iteration has begun after this call (True), or at once when
        no daemon is dequeuing, or after QUEUE_STALE_S without one (False: the daemon stopped)."""
        seen = self.queue_iteration()
        if seen is None or self._clock() - seen[1] > QUEUE_STALE_S:
            return False
        deadline = self._clock() + QUEUE_STALE_S
        while self._clock() < deadline:
            now = self.queue_iteration()
            if now is not None and now[0] > seen[0]:
                return True
            sleep(poll_s)
        return False
