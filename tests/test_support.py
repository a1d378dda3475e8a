"""The test support itself: stopping a real daemon leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from tests.support.dagster_services import daemon, start_sensor, wait_until
from tests.support.registries import command_pipeline, config, write_registry


def semaphores() -> set[str]:
    """Python multiprocessing's named POSIX semaphores on this machine."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("sem.mp-")}


@pytest.mark.daemon
@pytest.mark.serial  # counts every named semaphore on the machine
def test_stopping_a_daemon_with_a_run_in_flight_leaks_no_semaphore(dagster_home, instance,
                                                                   tmp_path: Path):
    """Dagster's code server holds a spawn-context Queue and Event (named semaphores) per run
    it starts; killing it and its resource tracker together left them in /dev/shm."""
    slow = command_pipeline("train", "import time; time.sleep(40)", timeout_s=60)
    registry = write_registry(tmp_path / "reg", [config(
        "slow", sandbox={"services": []}, pipelines=[slow], ui_smoke={"routes": []})],
        engines={"e1": {}})
    instance.add_dynamic_partitions("config", ["slow"])
    before = semaphores()
    log = tmp_path / "daemon.log"
    start_sensor(dagster_home, registry, "stale_scanner")  # off by default

    with daemon(dagster_home, registry, log):  # the stale scanner starts the untested partition
        wait_until(lambda: [r for r in instance.get_runs()
                            if r.status == dg.DagsterRunStatus.STARTED], 120, "a started run",
                   log)

    assert semaphores() - before == set()
