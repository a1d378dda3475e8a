"""How `mlci run` executes partitions: each lifecycle is a Dagster run on the instance at
$DAGSTER_HOME, executed in a worker process of its own.

A worker runs in a session of its own, so a terminal's Ctrl-C reaches `mlci run` alone, which
then asks each run to stop (CANCELING, as the UI's Terminate does) and interrupts its worker:
the lifecycle tears down, records that it was interrupted, and its run ends CANCELED. A worker
dies with its parent (SIGINT at the parent's death, so it tears down on the way out). A worker
that dies is noticed here: its run is marked failed, its sandboxes are reaped at once, and the
partition is reported lost.

A partition starts only when no run of it is in progress on the instance (whoever started that
one) and its pool admits one more run (launch/admission.py, the rule the daemon's run queue
keeps too); the check and the run's start happen under one file lock that every `mlci run` on
the home shares. A partition waits for its pool at most `max_wait_s`.

The worker itself is `python -m mlci_dagster.worker` (at the package's top: it builds the
Definitions).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from mlci_dagster.compat import instance_connection, report_run_canceling
from mlci_dagster.event_log import record_of_run
from mlci_dagster.launch.admission import AdmissionStore, free_slots
from mlci_dagster.launch.reruns import Rerun
from mlci_dagster.launch.workers import IN_PROGRESS, UNFINISHED, fail_lost_run
from mlci_dagster.paths import run_log_dir
from mlci_dagster.providers.processes import die_with_parent
from mlci_dagster.vocabulary import (
    PARTITION_TAG,
    POOL_TAG,
    RERUN_OF_TAG,
    SEARCH_TAG,
    SHA_TAG,
    attempt_of,
    trigger_of,
)

# A failed lifecycle is reported by `mlci`, not by Dagster's console; every event is still in
# the run's log in the instance.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
POLL_S = 0.2
CREATE_WAIT_S = 60  # how long the lock is held for a worker's run to be in progress


class Verdict(enum.StrEnum):
    """How one partition of an `mlci run` ended."""

    PASSED = "passed"
    FAILED = "FAILED"
    LOST = "LOST"  # its worker died before its run finished
    SKIPPED = "SKIPPED"  # refused before it began (the budget, a reservation): no verdict
    CANCELED = "CANCELED"  # interrupted and torn down: no verdict
    NOT_RUN = "NOT RUN"  # never started: already in progress, waited too long, interrupted
    RERUN = "FAILED, rerun"  # failed, and its rerun (the next item of its cell) decides
    FLAKY = "FLAKY"  # passed on a rerun after failing: no regression


# Verdicts that make `mlci run` exit non-zero: a failure, a run lost or stopped from outside
# (Terminate in the UI) before its verdict; NOT RUN too, unless the partition runs elsewhere.
NON_ZERO = {Verdict.FAILED, Verdict.LOST, Verdict.CANCELED}


@dataclass
class PartitionRun:
    key: str
    run_id: str
    pool: str
    started: float = 0.0
    seconds: float = 0.0
    verdict: Verdict | None = None
    why: str = ""  # what the verdict rests on, in a line
    waiting_since: float | None = None
    counts: bool = True  # a NOT RUN that is no failure (the partition runs elsewhere) is False
    tags: dict[str, str] = field(default_factory=dict)  # the run's own (a culprit rerun's)

    @property
    def success(self) -> bool:
        return self.verdict is Verdict.PASSED

    @property
    def failed(self) -> bool:
        return self.verdict in NON_ZERO or (self.verdict is Verdict.NOT_RUN and self.counts)


class RunEvents:
    """What the runner tells as it goes (the CLI prints it); each method does nothing here."""

    def started(self, item: PartitionRun) -> None: ...

    def waiting(self, item: PartitionRun, why: str) -> None: ...

    def finished(self, item: PartitionRun) -> None: ...

    def lost(self, item: PartitionRun) -> None:
        """A worker died before its run finished (the run is marked failed): reap its sandboxes."""

    def stopping(self, running: list[PartitionRun], why: str) -> None: ...

    def tick(self) -> None: ...


def new_batch(label: str = "", now: datetime | None = None) -> str:
    """An `mlci run`'s batch (a column of the grid): when it started, and a mark of its own, so
    two runs started in the same second are two batches; `label` says what it ran (a plan)."""
    return f"mlci run {label + ' ' if label else ''}" \
           f"{(now or datetime.now(UTC)):%Y-%m-%d %H:%M:%S} {uuid.uuid4().hex[:6]}"


def describe_run(run: dg.DagsterRun) -> str:
    """`run 4a8878cb (inject|e1, schedule)`: a run as the waiting lines name it."""
    return f"run {run.run_id[:8]} ({run.tags.get(PARTITION_TAG, run.job_name)}, " \
           f"{trigger_of(run.tags)})"


class Gate:
    """Lets a partition start only when no run of it is active and its pool admits one more run
    (launch/admission.py: the one rule, which the daemon's run queue keeps too).

    Under a file lock that concurrent `mlci run`s on the home share: the partition's check, and
    the pool's admission, held until the worker has created its run and it is in progress (then
    its pool tag counts it, for the daemon's queue too). `held`: each pool's slots held outside
    any run (a reservation's daytime holds).
    """

    def __init__(self, instance: dg.DagsterInstance, limits: dict[str, int], home: Path,
                 held: Callable[[], dict[str, int]] = dict) -> None:
        self.instance = instance
        self.limits = limits
        self.held = held
        self.admission = AdmissionStore(lambda: instance_connection(instance))
        self.lock_path = home / "pools.lock"
        home.mkdir(parents=True, exist_ok=True)

    def active_runs(self, tags: dict[str, str], statuses: list[dg.DagsterRunStatus]
                    ) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(dg.RunsFilter(tags=tags, statuses=statuses)))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def try_start(self, item: PartitionRun, start: Callable[[], str]) -> tuple[bool, str]:
        """Calls `start` (which returns the run id it launched) when the partition may start,
        and holds the lock until that run is in progress on the instance. Else (False, why):
        `already in progress: ...` when a run of the partition is active, or what fills its
        pool."""
        with self._locked():
            active = [run for run in self.active_runs({PARTITION_TAG: item.key}, UNFINISHED)
                      if same_cell(run.tags, item.tags)]
            if active:
                return False, f"already in progress: {describe_run(active[0])}"
            limit = self.limits.get(item.pool)
            if limit is None:
                self._started(start())
                return True, ""
            if (why := self._full(item, limit)) is not None:
                return False, why  # no claim for a pool seen full: the queue keeps its turn
            self.admission.claim(item.pool, item.run_id)
            try:
                self.admission.wait_for_queue()
                if (why := self._full(item, limit)) is not None:
                    return False, why
                self._started(start())
            finally:
                self.admission.release(item.run_id)
        return True, ""

    def _full(self, item: PartitionRun, limit: int) -> str | None:
        """What fills the item's pool (None: it admits one more run)."""
        holds = self.held().get(item.pool, 0)
        claims = self.admission.claims(besides=item.run_id).get(item.pool, 0)
        taken = self.active_runs({POOL_TAG: item.pool}, IN_PROGRESS)
        if free_slots(limit, len(taken), holds, claims) > 0:
            return None
        return self.full(item.pool, limit, holds, taken, claims)

    def _started(self, run_id: str) -> None:
        """Waits (at most CREATE_WAIT_S) until the run is in progress or over."""
        deadline = time.monotonic() + CREATE_WAIT_S
        while time.monotonic() < deadline:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and run.status != dg.DagsterRunStatus.NOT_STARTED:
                return
            time.sleep(POLL_S)

    @staticmethod
    def full(pool: str, limit: int, holds: int, taken: list[dg.DagsterRun],
             claims: int = 0) -> str:
        """`pool gpu-box is full (limit 1): run 4a8878cb (inject|e1, schedule)`."""
        shown = ", ".join(describe_run(run) for run in taken[:3])
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        held = f"{holds} slot(s) held by its daytime hold" if holds else ""
        admitting = f"{claims} run(s) being admitted elsewhere" if claims else ""
        return f"pool {pool} is full (limit {limit}): " + "; ".join(
            part for part in (shown + more, held, admitting) if part)


def same_cell(tags: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether a run of the partition (its `tags`) is the run `wanted` would be: a culprit
    search's rerun is its search's at its commit, beside the partition's runs in line."""
    if tags.get(SEARCH_TAG) != wanted.get(SEARCH_TAG):
        return False
    return SEARCH_TAG not in wanted or tags.get(SHA_TAG) == wanted.get(SHA_TAG)


class Stop(Exception):
    """Asks the runner to stop: its partitions in progress are cancelled and torn down."""


def run_partitions(
    instance: dg.DagsterInstance, registry: Path, items: list[PartitionRun],
    limits: dict[str, int], parallel: int, trigger: str, home: Path, events: RunEvents,
    *, batch: str, max_wait_s: Callable[[str], float], fail_fast: bool = False,
    held: Callable[[], dict[str, int]] = dict,
    reruns: Callable[[str], Rerun | None] | None = None,
) -> tuple[list[PartitionRun], str]:
    """Runs every partition, `parallel` at once and within pool limits (less the slots `held`
    by daytime holds), each waiting for its pool at most `max_wait_s(pool)`. Returns every
    item with its verdict, and why the runner stopped early ("" when it did not): an interrupt
    (KeyboardInterrupt: Ctrl-C, or SIGTERM turned into one by the caller) or `fail_fast` after a
    failure. Either way the partitions in progress are cancelled and torn down first.
    `reruns`: the deflake rerun a failed run is due (launch/reruns.py), run next as an item
    appended to `items`; the failed item's verdict is then RERUN, and its rerun's decides."""
    gate = Gate(instance, limits, home, held)
    pending = list(items)
    running: dict[str, tuple[subprocess.Popen, PartitionRun]] = {}
    stopped = ""

    def start(item: PartitionRun) -> str:
        # What the worker prints (Dagster's own warnings) goes to a log of its own, not into
        # mlci run's lines; every event of its run is in the instance.
        log = worker_log(home, item.run_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlci_dagster.worker", str(registry), item.key,
                 item.run_id, trigger, batch, json.dumps(item.tags)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGINT))  # tears down, then dies
        item.started = time.monotonic()
        running[item.run_id] = (proc, item)
        events.started(item)
        return item.run_id

    def settle(proc: subprocess.Popen, item: PartitionRun) -> None:
        del running[item.run_id]
        settled(instance, item, proc, home, stopping=bool(stopped))
        if item.verdict is Verdict.LOST:
            events.lost(item)
        again = reruns(item.run_id) if reruns and not stopped \
            and item.verdict is Verdict.FAILED else None
        if item.verdict is Verdict.PASSED and RERUN_OF_TAG in item.tags:
            item.verdict = Verdict.FLAKY
            item.why = f"passed on attempt {attempt_of(item.tags)}, after failing"
        elif item.verdict is Verdict.FAILED and RERUN_OF_TAG in item.tags and again is None:
            item.why = f"failed all {attempt_of(item.tags)} attempts" + (
                f"; {item.why}" if item.why else "")
        if again is not None:
            item.verdict = Verdict.RERUN
            item.why = f"attempt {again.attempt} next" + (f"; {item.why}" if item.why else "")
            rerun = PartitionRun(item.key, str(uuid.uuid4()), item.pool, tags=again.tags)
            items.append(rerun)
            pending.insert(0, rerun)
        events.finished(item)

    try:
        while pending or running:
            for item in list(pending):
                if len(running) >= parallel:
                    break
                started, why = gate.try_start(item, lambda item=item: start(item))
                if started:
                    pending.remove(item)
                elif why.startswith("already in progress"):
                    pending.remove(item)
                    not_run(item, why + "; its result is recorded there", counts=False)
                    events.finished(item)
                elif item.waiting_since is None or why != item.why:
                    item.waiting_since = item.waiting_since or time.monotonic()
                    item.why = why
                    events.waiting(item, why)
                elif time.monotonic() - item.waiting_since > max_wait_s(item.pool):
                    pending.remove(item)
                    not_run(item, f"waited {time.monotonic() - item.waiting_since:.0f}s (the "
                                  f"most any lifecycle of pool {item.pool} may take), {why}")
                    events.finished(item)
            for proc, item in list(running.values()):
                if proc.poll() is not None:
                    settle(proc, item)
                    if fail_fast and item.failed:
                        raise Stop(f"--fail-fast: {item.key} {item.verdict}")
            events.tick()
            time.sleep(POLL_S)
    except (KeyboardInterrupt, Stop) as exc:
        stopped = str(exc) if isinstance(exc, Stop) else "interrupted"
        events.stopping([item for _, item in running.values()], stopped)
        cancel(instance, [proc for proc, _ in running.values()],
               [item for _, item in running.values()], stopped)
        with ignoring_interrupts():
            for proc, item in list(running.values()):
                proc.wait()
                settle(proc, item)
        for item in pending:
            not_run(item, f"{stopped} before it started")
            events.finished(item)
    finally:
        # Anything else (a bug here): the workers get SIGINT and tear down on their way out.
        for proc, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
    return items, stopped


def not_run(item: PartitionRun, why: str, counts: bool = True) -> None:
    item.verdict, item.why, item.counts = Verdict.NOT_RUN, why, counts


def cancel(instance: dg.DagsterInstance, procs: list[subprocess.Popen],
           items: list[PartitionRun], why: str) -> None:
    """Asks each run to stop, as the UI's Terminate does, then interrupts its worker: the
    lifecycle tears down and records that it was interrupted."""
    for proc, item in zip(procs, items, strict=True):
        run = instance.get_run_by_id(item.run_id)
        if run is not None and not run.is_finished:
            report_run_canceling(instance, run, f"mlci run: {why}")
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """While the workers tear down, another Ctrl-C would only leave their sandboxes behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def worker_log(home: Path, run_id: str) -> Path:
    """Where a worker's own output goes."""
    return run_log_dir(home, run_id) / "worker.log"


def settled(instance: dg.DagsterInstance, item: PartitionRun, proc: subprocess.Popen,
            home: Path, stopping: bool = False) -> None:
    """The item's verdict once its worker has exited: from its run's status and record.
    `stopping`: the runner interrupted it, so a worker gone before its run began did not run."""
    item.seconds = time.monotonic() - item.started
    code = proc.returncode
    run = instance.get_run_by_id(item.run_id)
    if run is None and stopping:
        not_run(item, "interrupted before its run began")
        return
    if run is None or not run.is_finished:
        item.verdict = Verdict.LOST
        item.why = (f"worker pid {proc.pid} " + (
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}")
            + " before its run finished; run marked failed, its sandboxes reaped (its output: "
            f"{worker_log(home, item.run_id)})")
        if run is not None:
            fail_lost_run(instance, run, item.why)
        return
    record = record_of_run(instance, item.run_id)
    summary = record.error_summary.strip().splitlines()[:1] if record else []
    if run.status == dg.DagsterRunStatus.CANCELED or (record is not None and record.canceled):
        teardown = record.stages.get("teardown") if record else None
        item.verdict = Verdict.CANCELED
        item.why = (summary[0] if summary else "interrupted") + (
            f"; teardown: {teardown.status}" if teardown else "")
    elif run.status == dg.DagsterRunStatus.SUCCESS and record is not None and record.skipped:
        item.verdict, item.why = Verdict.SKIPPED, summary[0] if summary else ""
    elif run.status == dg.DagsterRunStatus.SUCCESS and code == 0:
        item.verdict = Verdict.PASSED
    else:
        item.verdict = Verdict.FAILED
        item.why = record.failing_tests_text() if record else ""
