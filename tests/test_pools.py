"""Pools on Dagster's own run queue: a real `dagster-daemon` on this registry."""

from __future__ import annotations

import os
import subprocess
import time

import dagster as dg
import pytest
import yaml

from tests.conftest import PY, command_pipeline, config, write_registry
from tests.support.dagster_services import daemon, start_sensor


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
