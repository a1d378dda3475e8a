"""Cleanup in layers, on real processes: the run-failure sensor and the janitor reap what a
killed run left, and the janitor alone reaps crashed and expired sandboxes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psutil
import pytest

from mlci_dagster.providers.handle import DestroyReport, SandboxHandle
from mlci_dagster.providers.janitor import registry_teardown_timeout, sweep
from mlci_dagster.providers.local import LocalProvider
from mlci_dagster.registry import load_registry
from mlci_dagster.registry.models import DEFAULT_TIMEOUTS_S
from mlci_dagster.vocabulary import STAGES, Stage
from tests.support.injection import inject, write_registry
from tests.support.registries import PY, http_service
from tests.support.runs import latest_record, processes_of_sandbox, stage_details


# Every stage is in benchmarks/failure_injection.py; CI keeps the stages with a sandbox alive.
@pytest.mark.parametrize("stage", [
    pytest.param(str(s), marks=[pytest.mark.slow] if s in (Stage.IMAGE, Stage.UI_SMOKE) else [])
    for s in STAGES])
def test_sigkill_in_each_stage_leaves_nothing_after_the_cleanup_layers(stage, tmp_path):
    registry = write_registry(tmp_path / "registry")

    result = inject(stage, tmp_path / "home", registry)

    print(f"leaks after SIGKILL in {stage}: {result['leaks']}")
    if stage != "image":
        assert result["sandboxes"] == 1
        assert result["left_by_crash"] > 0  # the crash did leave something to clean up
    assert result["leaks"] == 0, result["details"]
    assert result["run_status"] == dg.DagsterRunStatus.FAILURE  # the janitor ended it
    assert result["results"] == 0  # never recorded, least of all as a pass


def start_sandbox(provider: LocalProvider, registry_root: Path, run_id: str, ttl_s: float = 600,
                  config: str = "c"):
    spec = load_registry(registry_root).configs[config].config.sandbox.model_copy(
        update={"ttl_s": ttl_s})
    handle = provider.create(spec, config=config, engine="e1", run_id=run_id,
                             engine_variables={}, teardown_s=60)
    provider.wait_until_ready(handle, spec, 30)
    return handle


@contextlib.contextmanager
def a_port_kept_busy(provider: LocalProvider, handle: SandboxHandle) -> Iterator[int]:
    """The sandbox's ledger entry also names a port that something outside it listens on, so
    its destroy is unclean for a real reason: a port still in use. Yields that port; on the
    way out the port is let go and the sandbox destroyed."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        provider.ledger.record(dataclasses.replace(
            handle, ports={**handle.ports, "squatter": port}))
        try:
            yield port
        finally:
            squatter.close()
            for live in provider.list_live():
                if live.sandbox_id == handle.sandbox_id:
                    provider.destroy(live, timeout_s=60)


@pytest.fixture
def provider_registry(tmp_path: Path) -> tuple[LocalProvider, Path]:
    from tests.support.registries import config
    from tests.support.registries import write_registry as write

    root = write(tmp_path / "reg", [config("c", sandbox={"services": [http_service()]})])
    return LocalProvider(tmp_path / "home"), root


def test_janitor_reaps_a_sandbox_whose_process_died_and_keeps_live_ones(provider_registry):
    provider, root = provider_registry
    # A sandbox created by a process that then dies: the run never reports anything.
    creator = subprocess.run(
        [PY, "-c", "import sys; from pathlib import Path; "
         "from tests.test_cleanup import start_sandbox; "
         "from mlci_dagster.providers.local import LocalProvider; "
         "h = start_sandbox(LocalProvider(Path(sys.argv[1])), Path(sys.argv[2]), 'crashed'); "
         "print(h.sandbox_id)", str(provider.home), str(root)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
        env=os.environ)
    crashed = creator.stdout.strip()
    alive = start_sandbox(provider, root, "still-running")  # owned by this live process

    dry = sweep(provider, run_over=lambda run_id: False, teardown_timeout=lambda _: 60,
                dry_run=True)
    verdicts = {v.sandbox_id: v for v in sweep(provider, run_over=lambda run_id: False,
                                               teardown_timeout=lambda _: 60)}

    assert {v.sandbox_id for v in dry if v.reason} == {crashed}
    assert "lost its process" in verdicts[crashed].reason
    assert verdicts[crashed].report.clean
    assert processes_of_sandbox(crashed) == []
    assert verdicts[alive.sandbox_id].reason == ""  # kept: its run is alive
    assert processes_of_sandbox(alive.sandbox_id) != []
    provider.destroy(alive, timeout_s=60)


def test_janitor_reaps_expired_and_finished_runs(provider_registry):
    provider, root = provider_registry
    expired = start_sandbox(provider, root, "slow-run", ttl_s=60)
    finished = start_sandbox(provider, root, "done-run")

    verdicts = {v.sandbox_id: v for v in sweep(provider, run_over=lambda r: r == "done-run",
                                               teardown_timeout=lambda _: 60,
                                               now=time.time() + 61)}

    assert verdicts[expired.sandbox_id].reason.startswith("expired")
    assert verdicts[finished.sandbox_id].reason == "run done-run is over"
    assert provider.list_live() == []
    assert processes_of_sandbox(expired.sandbox_id) == processes_of_sandbox(
        finished.sandbox_id) == []


def test_mlci_janitor_dry_run_lists_without_reaping(dagster_home, provider_registry):
    _, root = provider_registry
    provider = LocalProvider(dagster_home / "mlci")
    handle = start_sandbox(provider, root, "no-such-run")
    try:
        dry = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(root), "janitor",
                              "--dry-run"], capture_output=True, text=True, env=os.environ,
                             timeout=60)
        assert handle.sandbox_id in dry.stdout and "would reap" in dry.stdout
        assert processes_of_sandbox(handle.sandbox_id) != []

        real = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(root), "janitor"],
                              capture_output=True, text=True, env=os.environ, timeout=60)
        assert real.returncode == 0 and "clean" in real.stdout
        assert processes_of_sandbox(handle.sandbox_id) == []
    finally:
        provider.destroy(handle, timeout_s=60)


def test_mlci_janitor_says_in_words_what_a_destroy_left(dagster_home, provider_registry):
    _, root = provider_registry
    provider = LocalProvider(dagster_home / "mlci")
    handle = start_sandbox(provider, root, "no-such-run")
    with a_port_kept_busy(provider, handle) as port:
        done = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(root), "janitor"],
                              capture_output=True, text=True, env=os.environ, timeout=120)

    assert done.returncode == 1, done.stdout + done.stderr
    [row] = [line for line in done.stdout.splitlines() if handle.sandbox_id in line]
    assert row.endswith(f"LEFT: ports still in use: {port}")


def test_the_teardown_stage_says_in_words_what_a_destroy_left(provider_registry, tmp_path):
    from mlci_dagster.stages.context import LifecycleContext
    from mlci_dagster.stages.teardown import tear_down

    provider, root = provider_registry
    handle = start_sandbox(provider, root, "run-1")
    ctx = LifecycleContext.create(load_registry(root), "c", "e1", "run-1", provider.home)
    with a_port_kept_busy(provider, handle) as port:
        outcome = tear_down(ctx, [])

    assert outcome.failure_kind == "infra"
    assert outcome.error_summary == (f"sandbox {handle.sandbox_id} not fully destroyed: ports "
                                     f"still in use: {port}")


def test_a_destroy_report_is_said_in_words_whichever_provider_made_it():
    local = DestroyReport(False, process_groups=["web"],
                          leaked_pids={"web": [4121, 4122], "outside their group": [4130]},
                          busy_ports=[8123], workdir_left=True)
    remote = DestroyReport(False, "namespace s-e1-1 is Terminating (finalizers: x/y)")

    assert local.left_behind() == ("processes left: web 4121 4122, outside their group 4130; "
                                   "ports still in use: 8123; work directory left")
    assert remote.left_behind() == "namespace s-e1-1 is Terminating (finalizers: x/y)"
    assert DestroyReport(True).left_behind() == ""
    assert DestroyReport(False).left_behind() == \
        "the provider could not verify that nothing is left"


def test_the_janitor_gives_a_sandbox_its_configs_teardown_s_or_the_registry_default(tmp_path):
    from tests.support.registries import config
    from tests.support.registries import write_registry as write

    root = write(tmp_path / "reg", [config("quick", timeouts={"teardown_s": 2}),
                                    config("plain")])
    teardown_timeout = registry_teardown_timeout(load_registry(root))

    def handle(config_name: str) -> SandboxHandle:
        return SandboxHandle(f"{config_name}.e1.0", "local", config_name, "e1", "run", 0.0, 1.0,
                             str(tmp_path / "w"), str(tmp_path / "l"))

    assert teardown_timeout(handle("quick")) == 2
    assert teardown_timeout(handle("plain")) == DEFAULT_TIMEOUTS_S[Stage.TEARDOWN]
    # Its config left the registry; the sandbox is still reaped, within the default.
    assert teardown_timeout(handle("removed")) == DEFAULT_TIMEOUTS_S[Stage.TEARDOWN]


def test_janitor_sensor_reports_what_it_reaped_as_metadata(instance, provider_registry):
    from mlci_dagster.definitions import build_definitions
    from mlci_dagster.sensors.cleanup import sandbox_janitor

    _, root = provider_registry
    provider = LocalProvider(Path(os.environ["DAGSTER_HOME"]) / "mlci")
    handle = start_sandbox(provider, root, "unknown-run")  # no such Dagster run: over
    resources = build_definitions(root).resources

    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = sandbox_janitor(context)

    [observation] = result.asset_events
    assert observation.metadata["reaped"].value == 1
    assert observation.metadata["sandboxes"].value[0]["sandbox_id"] == handle.sandbox_id
    assert processes_of_sandbox(handle.sandbox_id) == []


# --- kill -9 of `mlci run`, of its worker, of both -----------------------------------------


def slow_registry(root: Path) -> Path:
    """Config `slow`: a web service and a 30 s pipeline, so a kill lands in pipeline_runs."""
    from tests.support.registries import command_pipeline, config
    from tests.support.registries import write_registry as write

    return write(root, [config("slow", pipelines=[command_pipeline(
        "train", "import time; time.sleep(30)", timeout_s=60)])])


@pytest.fixture
def start_mlci_run(dagster_home: Path):
    """Starts `mlci --registry REGISTRY run ARGS` in a session of its own, as a terminal starts
    a foreground job; whatever the test's outcome, afterwards no process it started (its
    workers run in sessions of their own) and no sandbox of its home is left."""
    started: list[subprocess.Popen] = []

    def start(registry: Path, log: Path, *args: str) -> subprocess.Popen:
        with open(log, "wb") as out:
            started.append(subprocess.Popen(
                [PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run", *args],
                stdout=out, stderr=subprocess.STDOUT, env=os.environ, start_new_session=True))
        return started[-1]

    yield start
    for proc in started:
        kill_with_workers(proc)
    sweep(LocalProvider(dagster_home / "mlci"), run_over=lambda _: True,
          teardown_timeout=lambda _: 60)


def kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL to `mlci run` and its workers at once (each in a session of its own): nobody
    tears down, and the sandboxes they started are left for the cleanup layers."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for worker in psutil.Process(proc.pid).children():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def lifecycle_in_pipeline_runs(instance: dg.DagsterInstance) -> dg.DagsterRun:
    from tests.support.dagster_services import wait_until
    from tests.support.injection import stage_in_progress

    return wait_until(lambda: next((r for r in instance.get_runs() if r.job_name == "lifecycle"
                                    and stage_in_progress(instance, r.run_id, "pipeline_runs")),
                                   None), 90, "the lifecycle to reach pipeline_runs")


def sandbox_left(instance: dg.DagsterInstance, run_id: str) -> list[int]:
    handle = stage_details(instance, run_id, "sandbox")["handle"]
    return processes_of_sandbox(handle["sandbox_id"])


def test_sigkill_of_mlci_run_takes_its_worker_down_and_the_sandbox_with_it(
        dagster_home, instance, tmp_path, start_mlci_run):
    registry = slow_registry(tmp_path / "reg")
    mlci = start_mlci_run(registry, tmp_path / "run.log")
    run = lifecycle_in_pipeline_runs(instance)

    os.kill(mlci.pid, signal.SIGKILL)
    mlci.wait()

    from tests.support.dagster_services import wait_until
    # This run's worker (its argv names this test's registry), not another test's.
    wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"])
                            if {"mlci_dagster.worker", str(registry)} <= set(
                                p.info["cmdline"] or [])],
               60, "the worker to tear down and exit after losing its parent")
    # Nobody asked the run to stop: it failed, and its record says it was interrupted.
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    record = latest_record(instance, "slow|e1")
    assert record["status"] == "canceled" and record["run_id"] == run.run_id
    assert sandbox_left(instance, run.run_id) == []  # torn down on the way out
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


INTERRUPT_WHILE_STORING = """
import os, signal, sys
import dagster as dg
from dagster._core.instance import DagsterInstance
from mlci_dagster.worker import execute

store = DagsterInstance.handle_new_event

def store_then_interrupt(self, event, *args, **kwargs):
    store(self, event, *args, **kwargs)
    if event.dagster_event and event.dagster_event.is_step_materialization and \\
            event.dagster_event.asset_key == dg.AssetKey("sandbox"):
        os.kill(os.getpid(), signal.SIGINT)  # Dagster is between two yields of the lifecycle

DagsterInstance.handle_new_event = store_then_interrupt
sys.exit(0 if execute(sys.argv[1], "slow|e1", sys.argv[2], "manual") else 1)
"""


def test_an_interrupt_while_dagster_stores_a_stage_still_tears_the_sandbox_down(
        dagster_home, instance, tmp_path):
    """SIGINT while Dagster stores the sandbox's materialization is raised outside the
    lifecycle, which is never resumed; the resource's teardown reaps the sandbox anyway."""
    registry = slow_registry(tmp_path / "reg")
    instance.add_dynamic_partitions("config", ["slow"])
    run_id = "0f1e2d3c-0000-4000-8000-000000000001"
    try:
        worker = subprocess.run([PY, "-c", INTERRUPT_WHILE_STORING, str(registry), run_id],
                                capture_output=True, text=True, env=os.environ, timeout=120,
                                cwd=Path(__file__).parent.parent)

        assert worker.returncode == 1, worker.stderr
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert stage_details(instance, run_id, "sandbox")["handle"]  # it was created
        assert sandbox_left(instance, run_id) == []
        assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []
    finally:
        sweep(LocalProvider(dagster_home / "mlci"), run_over=lambda _: True,
              teardown_timeout=lambda _: 60)


def test_sigkill_of_a_worker_is_one_lost_line_a_failed_run_and_a_non_zero_exit(
        dagster_home, instance, tmp_path, start_mlci_run):
    registry = slow_registry(tmp_path / "reg")
    log = tmp_path / "run.log"
    mlci = start_mlci_run(registry, log)
    run = lifecycle_in_pipeline_runs(instance)
    [worker] = [p for p in psutil.Process(mlci.pid).children()
                if "mlci_dagster.worker" in p.cmdline()]

    worker.kill()
    code = mlci.wait(timeout=180)

    output = log.read_text()
    assert code == 1, output
    [lost] = [line for line in output.splitlines() if "slow|e1: LOST" in line]
    assert f"worker pid {worker.pid} killed by SIGKILL" in lost
    assert "Traceback" not in output
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert sandbox_left(instance, run.run_id) == []
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


def test_janitor_ends_a_run_whose_mlci_run_and_worker_both_died(
        dagster_home, instance, tmp_path, start_mlci_run):
    registry = slow_registry(tmp_path / "reg")
    mlci = start_mlci_run(registry, tmp_path / "run.log")
    run = lifecycle_in_pipeline_runs(instance)

    kill_with_workers(mlci)  # parent and worker at once: nobody tears down
    assert sandbox_left(instance, run.run_id) != []
    janitor = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry),
                              "janitor"], capture_output=True, text=True, env=os.environ,
                             timeout=120)

    assert janitor.returncode == 0, janitor.stdout + janitor.stderr
    assert f"run {run.run_id[:8]}: its worker process is gone; marked failed" in janitor.stdout
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert sandbox_left(instance, run.run_id) == []
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []
