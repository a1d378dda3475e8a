"""Cleanup in layers, on real processes: the run-failure sensor and the janitor reap what a
killed run left, and the janitor alone reaps crashed and expired sandboxes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.failure_injection import STAGES, inject, write_registry
from mlci_dagster.janitor import sweep
from mlci_dagster.providers.local import LocalProvider
from mlci_dagster.registry import load_registry
from tests.conftest import PY, http_service, processes_of_sandbox


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_in_each_stage_leaves_nothing_after_the_cleanup_layers(stage, tmp_path):
    registry = write_registry(tmp_path / "registry")

    result = inject(stage, tmp_path / "home", registry)

    print(f"leaks after SIGKILL in {stage}: {result['leaks']}")
    if stage != "image":
        assert result["sandboxes"] == 1
        assert result["left_by_crash"] > 0  # the crash did leave something to clean up
    assert result["leaks"] == 0, result["details"]


def start_sandbox(provider: LocalProvider, registry_root: Path, run_id: str, ttl_s: float = 600):
    spec = load_registry(registry_root).configs["c"].config.sandbox.model_copy(
        update={"ttl_s": ttl_s})
    handle = provider.create(spec, config="c", engine="e1", run_id=run_id, engine_variables={})
    provider.wait_until_ready(handle, spec, 30)
    return handle


@pytest.fixture
def provider_registry(tmp_path: Path) -> tuple[LocalProvider, Path]:
    from tests.conftest import config
    from tests.conftest import write_registry as write

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

    dry = sweep(provider, run_over=lambda run_id: False, dry_run=True)
    verdicts = {v.sandbox_id: v for v in sweep(provider, run_over=lambda run_id: False)}

    assert {v.sandbox_id for v in dry if v.reason} == {crashed}
    assert "lost its process" in verdicts[crashed].reason
    assert verdicts[crashed].report["clean"]
    assert processes_of_sandbox(crashed) == []
    assert verdicts[alive.sandbox_id].reason == ""  # kept: its run is alive
    assert processes_of_sandbox(alive.sandbox_id) != []
    provider.destroy(alive)


def test_janitor_reaps_expired_and_finished_runs(provider_registry):
    provider, root = provider_registry
    expired = start_sandbox(provider, root, "slow-run", ttl_s=0.5)
    finished = start_sandbox(provider, root, "done-run")
    time.sleep(1)

    verdicts = {v.sandbox_id: v for v in sweep(provider, run_over=lambda r: r == "done-run")}

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
        provider.destroy(handle)


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
