"""Pools on Dagster's own run queue: a real `dagster-daemon` on this registry."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlci_dagster.compat import instance_connection
from mlci_dagster.launch.admission import AdmissionStore
from tests.support.dagster_services import (
    LAUNCH_BACKFILL,
    daemon,
    graphql,
    service_env,
    start_sensor,
    wait_until,
    webserver,
)
from tests.support.registries import PY, command_pipeline, config, write_registry


@pytest.mark.daemon
def test_two_runs_queue_behind_a_pool_limit_of_one(dagster_home, tmp_path):
    slow = command_pipeline("train", "import time; time.sleep(3)")
    gpu = {"services": [], "pool": "gpu"}
    registry = write_registry(
        tmp_path / "reg", [config("a", sandbox=gpu, pipelines=[slow], ui_smoke={"routes": []}),
                           config("b", sandbox=gpu, pipelines=[slow], ui_smoke={"routes": []})],
        engines={"e1": {}})
    settings = yaml.safe_load((registry / "mlci.yaml").read_text())
    settings["pools"] = {"gpu": {"limit": 1, "description": "one GPU box"}}
    (registry / "mlci.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "MLCI_REGISTRY": str(registry)}
    sync = subprocess.run([PY, "-m", "mlci_dagster.cli", "sync"], env=env, text=True,
                          capture_output=True, timeout=60)
    assert "pool limits: gpu=1" in sync.stdout, sync.stdout + sync.stderr
    instance_yaml = yaml.safe_load((dagster_home / "dagster.yaml").read_text())
    # In the coordinator's config, which lowers a reservation's limit by its holds.
    assert instance_yaml["run_coordinator"]["config"]["tag_concurrency_limits"] == [
        {"key": "mlci/pool", "value": "gpu", "limit": 1}]

    # The stale scanner, turned on, asks for both untested partitions on its first tick.
    start_sensor(dagster_home, registry, "stale_scanner")
    seen_queued_behind = False
    with daemon(dagster_home, registry, tmp_path / "daemon.log"), \
            dg.DagsterInstance.get() as instance:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = [r for r in instance.get_runs() if r.job_name == "lifecycle"]
            in_progress = [r for r in runs if r.status in (
                dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)]
            queued = [r for r in runs if r.status == dg.DagsterRunStatus.QUEUED]
            assert len(in_progress) <= 1, "the pool limit of one was exceeded"
            seen_queued_behind |= bool(in_progress and queued)
            if len(runs) == 2 and all(r.is_finished for r in runs):
                break
            time.sleep(0.2)
        runs = [r for r in instance.get_runs() if r.job_name == "lifecycle"]
        records = {r.dagster_run.run_id: r for r in instance.get_run_records()}

    assert sorted(r.tags["dagster/partition"] for r in runs) == ["a|e1", "b|e1"]
    assert {r.tags["mlci/pool"] for r in runs} == {"gpu"}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert seen_queued_behind
    first, second = sorted((records[r.run_id] for r in runs), key=lambda r: r.start_time)
    assert second.start_time >= first.end_time  # one after the other, never side by side


def test_mlci_run_starts_a_pools_runs_one_at_a_time_even_with_parallel_two(
        dagster_home, tmp_path):
    from tests.test_launch_paths import pooled_registry

    registry = pooled_registry(tmp_path / "reg")  # a and b in pool gpu, limit 1, 3 s each
    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run",
                           "--parallel", "2"], capture_output=True, text=True, timeout=300,
                          env=os.environ)

    assert done.returncode == 0, done.stdout + done.stderr
    with dg.DagsterInstance.get() as instance:
        records = sorted((r for r in instance.get_run_records()
                          if r.dagster_run.job_name == "lifecycle"), key=lambda r: r.start_time)
    assert [r.dagster_run.tags["mlci/pool"] for r in records] == ["gpu", "gpu"]
    assert records[1].start_time >= records[0].end_time  # never side by side


# The statuses in which a run takes its pool's slot, as the daemon's run queue counts them.
TAKING_A_SLOT = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                 dg.DagsterRunStatus.CANCELING)


def contended_registry(root: Path, release: Path) -> Path:
    """Configs a, b and c in pool `gpu` (limit 1): a runs until the file `release` exists (it
    holds the pool while the race is set up), b and c for a second."""
    hold = command_pipeline("train", "import os, time\n"
                            f"while not os.path.exists({str(release)!r}): time.sleep(0.05)",
                            timeout_s=50)
    quick = command_pipeline("train", "import time; time.sleep(1)")
    gpu = {"services": [], "pool": "gpu"}
    write_registry(root, [config(n, sandbox=gpu, pipelines=[hold if n == "a" else quick],
                                 ui_smoke={"routes": []}) for n in ("a", "b", "c")],
                   engines={"e1": {}})
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    settings["pools"] = {"gpu": {"limit": 1}}
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings))
    return root


def race_mlci_run_and_a_ui_backfill(home: Path, tmp_path: Path, rounds: int = 2) -> None:
    """`mlci run` of a and b and a UI backfill of c (through the webserver's GraphQL, its run
    queued and dequeued by a real daemon), one pool of limit 1: while a holds the pool, b waits
    in `mlci run` and c in the daemon's queue; a ends, and both go for the slot at once (the
    daemon dequeues every 2 s, `mlci run` looks every 0.2 s and its worker takes seconds to
    boot). The instance's runs, sampled meanwhile, never show two of the pool in progress, and
    no two runs of the pool overlap."""
    from tests.test_launch_paths import LIFECYCLE

    release = tmp_path / "release-a"
    registry = contended_registry(tmp_path / "reg", release)
    env = service_env(home, registry)
    sync = subprocess.run([PY, "-m", "mlci_dagster.cli", "sync"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert "pool limits: gpu=1" in sync.stdout, sync.stdout + sync.stderr
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    settings["run_coordinator"]["config"]["dequeue_interval_seconds"] = 2
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    most = 0
    with webserver(home, registry, tmp_path / "web.log") as url, \
            daemon(home, registry, tmp_path / "daemon.log"), \
            dg.DagsterInstance.get() as instance:

        def pool_runs(partition: str | None = None, *statuses: dg.DagsterRunStatus
                      ) -> list[dg.DagsterRun]:
            return [r for r in instance.get_runs() if r.tags.get("mlci/pool") == "gpu"
                    and partition in (None, r.tags.get("dagster/partition"))
                    and (not statuses or r.status in statuses)]

        for round_ in range(1, rounds + 1):
            release.unlink(missing_ok=True)
            cli = subprocess.Popen([PY, "-m", "mlci_dagster.cli", "--registry", str(registry),
                                    "run", "--partitions", "a|e1,b|e1", "--parallel", "2"],
                                   env=env, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
            wait_until(lambda: pool_runs("a|e1", dg.DagsterRunStatus.STARTED), 120,
                       "a's run to hold the pool", tmp_path / "daemon.log")
            backfill = graphql(url, LAUNCH_BACKFILL, {"params": {
                "partitionNames": ["c|e1"], "assetSelection": [{"path": [a]} for a in LIFECYCLE]}})
            assert backfill["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess"
            wait_until(lambda: pool_runs("c|e1", dg.DagsterRunStatus.QUEUED), 120,
                       "the backfill's run in the queue", tmp_path / "daemon.log")
            release.touch()  # a ends: b and c go for its slot
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                runs = pool_runs()
                most = max(most, len([r for r in runs if r.status in TAKING_A_SLOT]))
                if cli.poll() is not None and len(runs) == 3 * round_ and all(
                        r.is_finished for r in runs):
                    break
                time.sleep(0.1)
            output = cli.communicate(timeout=60)[0]
            assert cli.returncode == 0, output
        records = [r for r in instance.get_run_records()
                   if r.dagster_run.tags.get("mlci/pool") == "gpu"]
        # The daemon's dequeue iterations were counted (compat.in_run_queue_daemon knew its
        # thread): admissions waited on them.
        iteration = AdmissionStore(lambda: instance_connection(instance)).queue_iteration()

    assert iteration is not None and iteration[0] >= 2, iteration
    assert most == 1, f"{most} runs of pool gpu (limit 1) were in progress at once"
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == [
        "a|e1", "a|e1", "b|e1", "b|e1", "c|e1", "c|e1"]
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    spans = sorted((r.start_time, r.end_time) for r in records)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans)), spans


@pytest.mark.daemon
def test_mlci_run_and_a_ui_backfill_never_run_two_of_a_pool_of_one(dagster_home, tmp_path):
    race_mlci_run_and_a_ui_backfill(dagster_home, tmp_path)
