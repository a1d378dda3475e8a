"""A matrix of lifecycle runs queued through a real webserver and dequeued by a real daemon, on
whatever storage a DAGSTER_HOME's dagster.yaml names: shared by the Postgres test and
`benchmarks/scale.py`. Runs are launched as the UI's backfill button launches them; the run
queue (the pool's tag concurrency limit) decides how many run at once."""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import yaml

from mlci_dagster.assets.history import HISTORY, stored_cursor
from mlci_dagster.event_log import RESULTS_ASSET, new_results
from mlci_dagster.vocabulary import RESULTS, STAGES
from tests.support.dagster_services import (
    LAUNCH_BACKFILL,
    daemon,
    graphql,
    service_env,
    wait_until,
    webserver,
)

LIFECYCLE = [*map(str, STAGES), RESULTS]
# What a storage that cannot keep up says: SQLite's lock, PostgreSQL's deadlocks and lock waits.
LOCK_ERROR = re.compile(r"database is locked|deadlock detected|could not obtain lock|"
                        r"LockNotAvailable|could not serialize access", re.IGNORECASE)
IN_PROGRESS = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)


@dataclass
class MatrixResult:
    runs: list[dg.DagsterRun]  # the lifecycle runs the backfills launched
    wall_s: float  # first launch to last run finished
    queue_to_start_s: list[float]  # per run: created (queued) to started
    most_in_progress: int
    record_run_ids: list[str] = field(default_factory=list)  # every results record's run
    history_run_ids: list[str] = field(default_factory=list)  # every stored history row's run
    lock_errors: list[str] = field(default_factory=list)

    @property
    def runs_per_minute(self) -> float:
        return len(self.runs) / self.wall_s * 60


def lifecycle_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return [r for r in instance.get_runs() if r.tags.get("dagster/partition")]


def pooled_copy(example: Path, target: Path, limit: int) -> Path:
    """The example registry with every provider's pool limited to `limit` runs at once."""
    shutil.copytree(example, target)
    settings = yaml.safe_load((target / "mlci.yaml").read_text())
    settings["pools"] = {"local": {"limit": limit, "description": "the run queue's limit"}}
    (target / "mlci.yaml").write_text(yaml.safe_dump(settings))
    return target


def queue_matrix(example: Path, workdir: Path, home: Path, runs: int, limit: int,
                 timeout_s: float | None = None) -> MatrixResult:
    """Backfills of the example's whole matrix until `runs` lifecycle runs are queued (a whole
    number of matrices), the daemon dequeuing them under a pool limit of `limit`; waits for
    every run and for the history to hold the newest result."""
    registry = pooled_copy(example, workdir / "registry", limit)
    env = service_env(home, registry)
    sync = subprocess.run([sys.executable, "-m", "mlci_dagster.cli", "sync"], env=env,
                          capture_output=True, text=True, timeout=300)
    if sync.returncode != 0:
        raise AssertionError(f"mlci sync failed:\n{sync.stdout}{sync.stderr}")
    partitions = [line.split()[0] for line in subprocess.run(
        [sys.executable, "-m", "mlci_dagster.cli", "list"], env=env, capture_output=True,
        text=True, timeout=120, check=True).stdout.splitlines() if "|" in line]
    if runs % len(partitions):
        raise ValueError(f"runs={runs}: expected a multiple of the {len(partitions)} partitions")
    logs = [workdir / "webserver.log", workdir / "daemon.log"]
    timeout_s = timeout_s or 120 + 30 * runs / limit
    with dg.DagsterInstance.from_config(str(home)) as instance, \
            webserver(home, registry, logs[0]) as url:
        started = time.monotonic()
        for _ in range(runs // len(partitions)):
            launched = graphql(url, LAUNCH_BACKFILL, {"params": {
                "partitionNames": partitions,
                "assetSelection": [{"path": [a]} for a in LIFECYCLE]}})
            if launched["launchPartitionBackfill"]["__typename"] != "LaunchBackfillSuccess":
                raise AssertionError(f"backfill refused: {launched}")
        most = 0
        with daemon(home, registry, logs[1]):

            def backfilled() -> list[dg.DagsterRun]:
                return [r for r in lifecycle_runs(instance) if "dagster/backfill" in r.tags]

            def all_done() -> bool:
                nonlocal most
                current = backfilled()
                most = max(most, sum(1 for r in lifecycle_runs(instance)
                                     if r.status in IN_PROGRESS))
                return len(current) == runs and all(r.is_finished for r in current)

            wait_until(all_done, timeout_s, f"{runs} queued runs to finish", logs[1],
                       interval_s=0.2)
            wall_s = time.monotonic() - started
            newest = instance.fetch_materializations(RESULTS_ASSET, limit=1).records[0]
            wait_until(lambda: stored_cursor(instance, HISTORY) >= newest.storage_id, 180,
                       "the history to hold the newest result", logs[1])
        done = backfilled()
        run_records = [instance.get_run_record_by_id(r.run_id) for r in done]
        return MatrixResult(
            runs=done, wall_s=wall_s, most_in_progress=most,
            queue_to_start_s=[r.start_time - r.create_timestamp.timestamp()
                              for r in run_records if r.start_time],
            record_run_ids=[record.run_id for _, record in new_results(instance, 0)],
            history_run_ids=stored_history_run_ids(home),
            lock_errors=lock_errors(instance, done, logs))


def stored_history_run_ids(home: Path) -> list[str]:
    """The run of every row of the history table as the filesystem IO manager stored it."""
    with open(home / "storage" / "history", "rb") as stored:
        return [str(run_id) for run_id in pickle.load(stored)["run_id"]]


def lock_errors(instance: dg.DagsterInstance, runs: list[dg.DagsterRun], logs: list[Path]
                ) -> list[str]:
    """Lines of the services' logs and the runs' events that tell of a storage lock."""
    found = [line for log in logs if log.exists()
             for line in log.read_text(errors="replace").splitlines() if LOCK_ERROR.search(line)]
    for run in runs:
        for entry in instance.all_logs(run.run_id):
            text = entry.user_message or ""
            if entry.dagster_event and entry.dagster_event.event_specific_data is not None:
                text += repr(entry.dagster_event.event_specific_data)
            if LOCK_ERROR.search(text):
                found.append(f"run {run.run_id[:8]}: {text[:300]}")
    return found


def sqlite_home(home: Path) -> Path:
    """A DAGSTER_HOME on the embedded default (SQLite), as `mlci` writes it."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home

