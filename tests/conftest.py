"""Shared fixtures: a real Dagster instance in a temporary DAGSTER_HOME, registries written
on the fly, and leak checks over real processes, ports and directories."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.providers.host import SANDBOX_ID_ENV
from mlci_dagster.providers.ports import port_is_free
from mlci_dagster.providers.processes import marked_processes
from tests.support.services import MARK, require_marked

PY = sys.executable
SLOW = os.environ.get("MLCI_SLOW") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}(name): runs a system service (tests/support/services.py): skipped "
        "where it is missing, a failure under CI=true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests repeat, on the same real service, a path another test covers in CI: an
    opt-in (MLCI_SLOW=1), so skipped in CI too."""
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow: a second case of a covered path; set MLCI_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `needs(service)` whose service is missing is skipped, or fails in CI,
    before its fixtures try to start the service."""
    require_marked(item)


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path):
    with dg.DagsterInstance.get() as inst:
        yield inst


def http_service(name: str = "web", timeout_s: float = 20) -> dict[str, Any]:
    return {
        "name": name,
        "command": [PY, "-m", "http.server", "${port}", "--bind", "127.0.0.1",
                    "--directory", "${sandbox.workdir}"],
        "ready": {"http": {"path": "/"}, "timeout_s": timeout_s},
    }


def command_pipeline(name: str, code: str, timeout_s: float = 30, **extra: Any) -> dict[str, Any]:
    return {"kind": "command", "name": name, "command": [PY, "-c", code],
            "timeout_s": timeout_s, **extra}


def config(name: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "owners": {"default": "test-team"},
        "image": {"ref": "example.test/platform@sha256:abc123"},
        "sandbox": {"services": [http_service()]},
        "pipelines": [command_pipeline("ok", "print('run_id=42')",
                                       outputs={"run_id": "run_id=(\\d+)"})],
        "ui_smoke": {"routes": [{"service": "web", "path": "/"}]},
        "timeouts": {"sandbox_s": 30, "pipeline_runs_s": 60, "ui_smoke_s": 30},
    }
    body.update(overrides)
    return body


def write_registry(root: Path, configs: list[dict[str, Any]], *,
                   engines: dict[str, Any] | None = None, secrets: list[str] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    settings = {"engines": engines or {"e1": {"variables": {"STORE": "${sandbox.workdir}/db"}}}}
    if secrets:
        settings["secrets"] = list(secrets)
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings))
    (root / "configs").mkdir(exist_ok=True)
    for body in configs:
        (root / "configs" / f"{body['name']}.yaml").write_text(yaml.safe_dump(body))
    return root


def leaky_registry(root: Path) -> Path:
    """Config `leaky`: a service that prints $MLCI_TEST_TOKEN to stderr, and a pipeline that
    prints it and fails. The variable is declared a secret."""
    leaky = {
        "name": "web",
        "command": [PY, "-c",
                    "import os, sys, http.server as h; "
                    "print('token is', os.environ['API_TOKEN'], file=sys.stderr, flush=True); "
                    "h.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
                    "h.SimpleHTTPRequestHandler).serve_forever()", "${port}"],
        "env": {"API_TOKEN": "${env.MLCI_TEST_TOKEN}"},
        "ready": {"http": {"path": "/"}, "timeout_s": 20},
    }
    failing = command_pipeline(
        "train", "import os, sys; print('auth', os.environ['API_TOKEN'], file=sys.stderr); "
        "sys.exit(1)", env={"API_TOKEN": "${env.MLCI_TEST_TOKEN}"})
    return write_registry(root, [config("leaky", sandbox={"services": [leaky]},
                                        pipelines=[failing])], secrets=["MLCI_TEST_TOKEN"])


def run_partition(instance: dg.DagsterInstance, registry: Path, key: str):
    """Runs one partition's lifecycle on the instance; returns (run result, results record)."""
    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    instance.add_dynamic_partitions("config", [key.split("|")[0]])
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                    run_config=QUIET)
    return result, latest_record(instance, key)


def latest_record(instance: dg.DagsterInstance, key: str) -> dict[str, Any] | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, asset_partitions=[key]), limit=1
    ).records
    return dict(records[0].asset_materialization.metadata["record"].value) if records else None


def stage_details(instance: dg.DagsterInstance, run_id: str, stage: str) -> dict[str, Any]:
    """The `details` of a stage's materialization in one run, read from that run's own events
    (the same source a test waits on, so there is no index lag to race)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is not None and materialization.asset_key == dg.AssetKey(stage):
            return dict(materialization.metadata["details"].value)
    raise AssertionError(f"no {stage} materialization in run {run_id}")


def processes_of_sandbox(sandbox_id: str) -> list[int]:
    """Live processes started for a sandbox: each carries MLCI_SANDBOX_ID in its environment."""
    return marked_processes(SANDBOX_ID_ENV, sandbox_id)


def assert_no_leaks(dagster_home: Path, handle: dict[str, Any]) -> None:
    assert processes_of_sandbox(handle["sandbox_id"]) == []
    assert [p for p in handle["ports"].values() if not port_is_free(p)] == []
    assert not Path(handle["workdir"]).exists()
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


def result_record(partition: str, status: str, started_at: float, digest: str = "d1",
                  kind: str | None = None, duration: float = 1.0,
                  cost: float | None = None) -> ResultRecord:
    """A valid results record, as the lifecycle writes it, with the fields a rule reads."""
    config, engine = partition.split("|")
    failed = None if status in ("pass", "skip") else status.removeprefix("fail-")
    return ResultRecord.model_validate({
        "partition": partition, "config": config, "engine": engine, "config_id": "c1",
        "status": status, "failed_stage": failed, "cost_usd": cost,
        "failure_kind": kind or (None if failed is None else "product"),
        "image_digest": digest, "code_version": "v1", "trigger": "schedule",
        "run_id": f"run-{partition}-{started_at}", "started_at": started_at,
        "finished_at": started_at + 60, "duration_s": duration,
        "stages": {"image": {"status": "pass", "duration_s": duration}},
        "pipelines": {"train": {"passed": status == "pass", "duration_s": duration}},
        "metrics": {}})
