"""How `mlci run` executes partitions: each lifecycle is a Dagster run on the instance at
$DAGSTER_HOME, executed in a worker process of its own.

A worker dies with its parent (SIGINT at the parent's death, so the lifecycle tears down on the
way out). A worker that dies is noticed here: its run is marked failed, its sandboxes are reaped
at once, and the partition is reported lost. Runs of a pool start only while fewer than the
pool's limit are in progress on the instance, whoever started them.

Run as `python -m mlci_dagster.runner REGISTRY KEY RUN_ID TRIGGER [BATCH]` it is that worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from mlci_dagster.pools import POOL_TAG
from mlci_dagster.providers.processes import die_with_parent
from mlci_dagster.run_workers import IN_PROGRESS, WORKER_TAG, fail_lost_run, worker_identity
from mlci_dagster.vocabulary import BATCH_TAG

# A failed lifecycle is reported by `mlci`, not by Dagster's console; every event is still in
# the run's log in the instance.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
POLL_S = 0.2


@dataclass
class PartitionRun:
    key: str
    run_id: str
    pool: str
    started: float = 0.0
    seconds: float = 0.0
    success: bool = False
    lost: str = ""  # why the worker is gone, when it died before its run finished


class PoolGate:
    """Lets a run of a pool start only while fewer than the pool's limit are in progress.

    Counts the instance's runs with the pool tag (the daemon's queue counts the same tag), under
    a file lock that concurrent `mlci run`s share; a run counts from the moment it is started
    here until its worker has created it on the instance. A reservation's limit is lowered by
    its daytime holds, as the run queue's is (`held`: slots held outside any run, per pool).
    """

    def __init__(self, instance: dg.DagsterInstance, limits: dict[str, int], home: Path,
                 held: Callable[[], dict[str, int]] = dict) -> None:
        self.instance = instance
        self.limits = limits
        self.held = held
        self.lock_path = home / "pools.lock"
        home.mkdir(parents=True, exist_ok=True)

    def in_progress(self, pool: str) -> int:
        return self.instance.get_runs_count(dg.RunsFilter(tags={POOL_TAG: pool},
                                                          statuses=IN_PROGRESS))

    def try_start(self, pool: str, start: Callable[[], str]) -> bool:
        """Calls `start` (which returns the run id it launched) if the pool has room, and holds
        the lock until that run exists on the instance, so no one else counts past the limit."""
        limit = self.limits.get(pool)
        if limit is None:
            start()
            return True
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.in_progress(pool) >= limit - self.held().get(pool, 0):
                return False
            run_id = start()
            deadline = time.monotonic() + 60
            while not self.instance.has_run(run_id) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        return True


def run_partitions(
    instance: dg.DagsterInstance, registry: Path, keys: list[str], pools: dict[str, str],
    limits: dict[str, int], parallel: int, trigger: str, home: Path,
    on_done: Callable[[PartitionRun], None],
    on_lost: Callable[[PartitionRun], None],
    on_wait: Callable[[PartitionRun], None] = lambda item: None,
    held: Callable[[], dict[str, int]] = dict,
    on_start: Callable[[PartitionRun], None] = lambda item: None,
    on_tick: Callable[[], None] = lambda: None,
) -> list[PartitionRun]:
    """Runs every partition, `parallel` at once and within pool limits (less the slots `held`
    by daytime holds); calls `on_done` as each finishes. `on_lost` is called for a worker that
    died (after its run is marked failed), so the caller can reap its sandboxes; `on_wait` once
    for a partition whose pool is full when its turn comes; `on_start` as a worker starts, and
    `on_tick` at every pass of the loop (progress)."""
    gate = PoolGate(instance, limits, home, held)
    # One `mlci run` is one batch: a column of the grid.
    batch = f"mlci run {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
    pending = deque(PartitionRun(key, str(uuid.uuid4()), pools[key]) for key in keys)
    running: dict[str, tuple[subprocess.Popen, PartitionRun]] = {}
    finished: list[PartitionRun] = []
    waited: set[str] = set()
    try:
        while pending or running:
            for _ in range(len(pending)):
                if len(running) >= parallel:
                    break
                item = pending.popleft()

                def start(item: PartitionRun = item) -> str:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "mlci_dagster.runner", str(registry), item.key,
                         item.run_id, trigger, batch],
                        stdin=subprocess.DEVNULL,
                        preexec_fn=die_with_parent(signal.SIGINT))  # tears down, then dies
                    item.started = time.monotonic()
                    running[item.run_id] = (proc, item)
                    on_start(item)
                    return item.run_id

                if not gate.try_start(item.pool, start):
                    pending.append(item)  # its pool is full: try the next partition
                    if item.run_id not in waited:
                        waited.add(item.run_id)
                        on_wait(item)
            for run_id, (proc, item) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[run_id]
                item.seconds = time.monotonic() - item.started
                run = instance.get_run_by_id(run_id)
                item.success = code == 0 and run is not None and \
                    run.status == dg.DagsterRunStatus.SUCCESS
                if run is None or not run.is_finished:
                    item.lost = (f"worker pid {proc.pid} " + (
                        f"killed by {signal.Signals(-code).name}" if code < 0
                        else f"exited {code}") + " before its run finished")
                    if run is not None:
                        fail_lost_run(instance, run, item.lost)
                    on_lost(item)
                finished.append(item)
                on_done(item)
            on_tick()
            time.sleep(POLL_S)
    finally:
        # Interrupted ourselves: the workers get SIGINT and tear down on their way out.
        for proc, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
    return finished


def execute(registry: str, key: str, run_id: str, trigger: str, batch: str = "") -> bool:
    """In the worker: the partition's lifecycle as Dagster run `run_id`, in `batch`."""
    from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
    from mlci_dagster.resources.mlci import TRIGGER_TAG

    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False, run_id=run_id,
            tags={TRIGGER_TAG: trigger, WORKER_TAG: worker_identity(os.getpid()),
                  **({BATCH_TAG: batch} if batch else {})},
            run_config=QUIET_RUN_CONFIG)
    return result.success


if __name__ == "__main__":
    sys.exit(0 if execute(*sys.argv[1:6]) else 1)
