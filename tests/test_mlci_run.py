"""`mlci run` as a user drives it, on real processes and a real Dagster instance: Ctrl-C and
SIGTERM cancel and tear down, two `mlci run`s on one home never run a partition twice nor merge
their batches, a wait on a pool is bounded and says what it waits for, `--fail-fast`,
`--partitions`, `--plan` and `--dry-run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from mlci_dagster.launch.runner import new_batch
from mlci_dagster.vocabulary import POOL_TAG
from tests.support.dagster_services import wait_until
from tests.support.registries import PY, command_pipeline, config, write_registry
from tests.support.runs import latest_record
from tests.test_cleanup import start_mlci_run  # noqa: F401


def slow_registry(root: Path, seconds: float = 30) -> Path:
    """Config `slow`: a web service and a pipeline of `seconds`, so a signal lands in
    pipeline_runs; config `quick` beside it passes in a few seconds, `broken` fails after 5 s
    (by then a partition started beside it is in its pipelines)."""
    return write_registry(root, [
        config("slow", pipelines=[command_pipeline(
            "train", f"import time; time.sleep({seconds})", timeout_s=seconds + 30)]),
        config("quick", ui_smoke={"routes": []}),
        config("broken", sandbox={"services": []}, ui_smoke={"routes": []},
               pipelines=[command_pipeline("train", "import sys, time; time.sleep(5); "
                                                    "sys.exit(3)")]),
    ])


@pytest.fixture
def mlci(start_mlci_run):  # noqa: F811
    """`mlci --registry REGISTRY run ARGS`, as test_cleanup's start_mlci_run starts it."""

    def start(registry: Path, *args: str, log: Path) -> subprocess.Popen:
        return start_mlci_run(registry, log, *args)

    return start


def run_in(instance: dg.DagsterInstance, stage: str, partition: str = "slow|e1") -> dg.DagsterRun:
    from tests.support.injection import stage_in_progress

    return wait_until(lambda: next(
        (r for r in instance.get_runs() if r.tags.get("dagster/partition") == partition
         and stage_in_progress(instance, r.run_id, stage)), None), 90,
        f"{partition} to reach {stage}")


def pipeline_running(seconds: float = 30) -> bool:
    """Whether slow's pipeline process runs: the lifecycle is inside pipeline_runs. Right after
    the sandbox stage is materialized Dagster may still be storing its events, and an interrupt
    landing then is raised outside the lifecycle: the sandbox is reaped (the resource's
    teardown_after_execution) but no record is written, a gap these tests do not aim at."""
    code = f"time.sleep({seconds})"
    return any(code in " ".join(p.info["cmdline"] or [])
               for p in psutil.process_iter(["cmdline"]))


def no_sandbox_left(dagster_home: Path) -> bool:
    return list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_cancels_each_run_tears_it_down_records_it_and_exits_128_plus_n(
        sig, dagster_home, instance, tmp_path, mlci):
    """Ctrl-C reaches the terminal's foreground process group; SIGTERM is what a CI runner
    sends to cancel a job."""
    registry = slow_registry(tmp_path / "reg")
    log = tmp_path / "run.log"
    proc = mlci(registry, "--config", "slow", log=log)
    run = run_in(instance, "pipeline_runs")
    wait_until(pipeline_running, 60, "slow's pipeline process")

    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)

    output = log.read_text()
    assert code == 128 + sig, output
    assert "Traceback" not in output
    assert "interrupted: cancelling 1 partition(s) in progress and tearing down their " \
           "sandboxes: slow|e1" in output
    [line] = [line for line in output.splitlines() if line.startswith("  slow|e1: CANCELED")]
    assert f"(run {run.run_id[:8]}): pipeline_runs: interrupted after" in line
    assert line.endswith("teardown: pass")
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
    record = latest_record(instance, "slow|e1")
    assert record["status"] == "canceled" and record["run_id"] == run.run_id
    assert record["error_summary"].startswith("pipeline_runs: interrupted after")
    assert record["stages"]["teardown"]["status"] == "pass"
    # Its evidence is left to the artifact_upload sensor: stopping does not wait for the store.
    assert record["artifacts"] == {} and record["artifacts_pending"]
    assert {p["why"] for p in record["artifacts_pending"]} == {"the run was interrupted"}
    assert no_sandbox_left(dagster_home)
    report = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry),
                             "report", "--config", "slow"], capture_output=True, text=True,
                            env=os.environ, timeout=120)
    assert "slow|e1: canceled: pipeline_runs: interrupted after" in report.stdout


def test_a_stop_whose_signal_never_arrives_still_cancels_and_records(dagster_home, instance,
                                                                     tmp_path, mlci):
    """The run asked to stop (CANCELING, as the UI's Terminate marks it) while no interrupt
    reaches its worker (Python can drop one raised inside a fork's callbacks): the worker sends
    itself one until its lifecycle has seen it. From outside, so mlci run exits 1."""
    from mlci_dagster.compat import report_run_canceling

    registry = slow_registry(tmp_path / "reg")
    log = tmp_path / "run.log"
    proc = mlci(registry, "--config", "slow", log=log)
    run = run_in(instance, "pipeline_runs")

    report_run_canceling(instance, run, "asked with no signal")

    assert proc.wait(timeout=120) == 1, log.read_text()
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
    record = latest_record(instance, "slow|e1")
    assert record["status"] == "canceled" and record["stages"]["teardown"]["status"] == "pass"
    assert "slow|e1: CANCELED" in log.read_text()
    assert no_sandbox_left(dagster_home)


def test_a_second_mlci_run_never_starts_a_partition_in_progress_and_batches_stay_apart(
        dagster_home, instance, tmp_path, mlci):
    registry = slow_registry(tmp_path / "reg", seconds=8)
    first = mlci(registry, "--config", "slow", log=tmp_path / "1.log")
    run = run_in(instance, "pipeline_runs")

    second = mlci(registry, "--config", "slow", "--config", "quick",
                  log=tmp_path / "2.log")
    assert second.wait(timeout=180) == 0, (tmp_path / "2.log").read_text()
    assert first.wait(timeout=180) == 0, (tmp_path / "1.log").read_text()

    output = (tmp_path / "2.log").read_text()
    assert f"slow|e1: NOT RUN: already in progress: run {run.run_id[:8]} (slow|e1, manual); " \
           "its result is recorded there" in output
    assert "quick|e1: passed" in output
    runs = [r for r in instance.get_runs() if r.job_name == "lifecycle"]
    assert sorted(r.tags["dagster/partition"] for r in runs) == ["quick|e1", "slow|e1"]
    assert len({r.tags["mlci/batch"] for r in runs}) == 2


def test_two_mlci_runs_started_together_run_each_partition_once(dagster_home, instance,
                                                                tmp_path, mlci):
    registry = slow_registry(tmp_path / "reg", seconds=2)
    procs = [mlci(registry, "--config", "slow",
                  log=tmp_path / f"{i}.log") for i in range(2)]

    codes = [p.wait(timeout=180) for p in procs]

    outputs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs
    assert len([r for r in instance.get_runs() if r.job_name == "lifecycle"]) == 1
    assert sum("slow|e1: NOT RUN: already in progress" in out for out in outputs) == 1


def test_batches_started_in_the_same_second_are_two():
    moment = datetime(2026, 12, 6, 20, 41, 15, tzinfo=UTC)
    first, second = new_batch(now=moment), new_batch(now=moment)
    assert first != second and first.startswith("mlci run 2026-12-06 20:41:15 ")


def pooled(registry: Path) -> Path:
    """The registry with `quick` in pool `gpu`, limit 1."""
    settings = yaml.safe_load((registry / "mlci.yaml").read_text())
    settings["pools"] = {"gpu": {"limit": 1}}
    (registry / "mlci.yaml").write_text(yaml.safe_dump(settings))
    body = yaml.safe_load((registry / "configs" / "quick.yaml").read_text())
    body["sandbox"]["pool"] = "gpu"
    (registry / "configs" / "quick.yaml").write_text(yaml.safe_dump(body))
    return registry


def test_a_wait_for_a_full_pool_is_bounded_and_says_what_holds_it(dagster_home, instance,
                                                                 tmp_path):
    registry = pooled(slow_registry(tmp_path / "reg"))
    # A run of the pool that never ends, started elsewhere (its process gone for good).
    holder = instance.add_run(dg.DagsterRun(
        job_name="lifecycle", status=dg.DagsterRunStatus.STARTED,
        tags={POOL_TAG: "gpu", "dagster/partition": "other|e1", "mlci/trigger": "schedule"}))

    started = time.monotonic()
    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run",
                           "--config", "quick", "--max-wait", "3"], capture_output=True,
                          text=True, env=os.environ, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - started < 60
    waiting = f"pool gpu is full (limit 1): run {holder.run_id[:8]} (other|e1, schedule)"
    assert f"quick|e1: waiting: {waiting}" in done.stdout
    assert f"quick|e1: NOT RUN: waited 3s (the most any lifecycle of pool gpu may take), " \
           f"{waiting}" in done.stdout or "quick|e1: NOT RUN: waited 4s" in done.stdout
    assert [r.run_id for r in instance.get_runs() if r.job_name == "lifecycle"] == \
           [holder.run_id]


def test_ctrl_c_while_waiting_for_a_pool_starts_nothing_and_says_so(dagster_home, instance,
                                                                    tmp_path, mlci):
    registry = pooled(slow_registry(tmp_path / "reg"))
    instance.add_run(dg.DagsterRun(
        job_name="lifecycle", status=dg.DagsterRunStatus.STARTED,
        tags={POOL_TAG: "gpu", "dagster/partition": "other|e1", "mlci/trigger": "schedule"}))
    log = tmp_path / "run.log"
    proc = mlci(registry, "--config", "quick", log=log)
    wait_until(lambda: "quick|e1: waiting: pool gpu is full" in log.read_text(), 60,
               "mlci run to wait for its pool")

    os.killpg(proc.pid, signal.SIGINT)

    assert proc.wait(timeout=60) == 130
    output = log.read_text()
    assert "Traceback" not in output
    assert "quick|e1: NOT RUN: interrupted before it started" in output
    assert [r.tags["dagster/partition"] for r in instance.get_runs()] == ["other|e1"]


def test_fail_fast_cancels_what_runs_and_starts_no_more(dagster_home, instance, tmp_path):
    registry = slow_registry(tmp_path / "reg")

    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run",
                           "--partitions", "broken|e1,slow|e1", "--partitions", "quick|e1",
                           "--parallel", "2", "--fail-fast"], capture_output=True, text=True,
                          env=os.environ, timeout=180)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "broken|e1: FAILED" in done.stdout
    assert "--fail-fast: broken|e1 FAILED: cancelling 1 partition(s) in progress" in done.stdout
    assert "slow|e1: CANCELED" in done.stdout
    assert "quick|e1: NOT RUN: --fail-fast: broken|e1 FAILED before it started" in done.stdout
    assert {r.tags["dagster/partition"] for r in instance.get_runs()
            if r.job_name == "lifecycle"} == {"broken|e1", "slow|e1"}
    assert no_sandbox_left(dagster_home)


def test_a_plan_from_mlci_plan_is_one_batch_and_a_dry_run_starts_nothing(dagster_home, instance,
                                                                         tmp_path):
    registry = slow_registry(tmp_path / "reg")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "tier": "pr", "revisions": {"head_commit": "1a2b3c4d5e6f7a8b"},
        "partitions": [{"partition": "quick|e1", "config": "quick", "engine": "e1",
                        "triggers": [{"path": "configs/quick.yaml", "source": "its file"}]}]}))

    dry = subprocess.run([PY, "-m", "mlci_dagster.cli", "run", "--registry", str(registry),
                          "--plan", str(plan), "--dry-run"], capture_output=True, text=True,
                         env=os.environ, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "would run 1 partition" in dry.stdout
    assert "quick|e1" in dry.stdout and "plan: configs/quick.yaml (its file)" in dry.stdout
    assert instance.get_runs() == []

    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "run", "--registry", str(registry),
                           "--plan", "-"], input=plan.read_text(), capture_output=True,
                          text=True, env=os.environ, timeout=180)  # as from `mlci plan | `

    assert done.returncode == 0, done.stdout + done.stderr
    [run] = [r for r in instance.get_runs() if r.job_name == "lifecycle"]
    assert run.tags["dagster/partition"] == "quick|e1"
    assert run.tags["mlci/batch"].startswith("mlci run plan pr@1a2b3c4d5e ")


@pytest.mark.parametrize(("args", "message"), [
    (["--parallel", "0"], "argument --parallel: expected a whole number above 0, got 0"),
    (["--parallel", "-3"], "argument --parallel: expected a whole number above 0, got -3"),
    (["--parallel", "two"], "argument --parallel: expected a whole number, got 'two'"),
    (["--max-wait", "0"], "argument --max-wait: expected a number above 0, got 0"),
    (["--engine", "mysql"], "--engine mysql: not in the registry (known: e1)"),
    (["--config", "nope"], "--config nope: not in the registry (known: broken, quick, slow)"),
    (["--partitions", "slow|e9"], "slow|e9: engine 'e9' does not apply to config 'slow' "
                                  "(expected one of: e1)"),
    (["--partitions", "nope|e1"], "nope|e1: config 'nope' is not in the registry"),
    (["--tier", "weekly"], "--tier weekly: not in the registry (known: nightly)"),
    (["--plan", "/nonexistent.json"], "--plan /nonexistent.json: cannot be read"),
])
def test_a_usage_error_is_refused_at_once_with_exit_2(args, message, dagster_home, tmp_path):
    registry = slow_registry(tmp_path / "reg")
    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run",
                           *args], capture_output=True, text=True, env=os.environ, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert not (dagster_home / "mlci").exists()  # nothing was started or created
