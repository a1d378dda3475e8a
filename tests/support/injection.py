"""Failure injection: SIGKILL of the process executing a lifecycle in the middle of a stage, then
the cleanup layers outside the run (the janitor, which ends runs whose worker is gone and reaps
their sandboxes; the run-failure sensor). Used by tests/test_cleanup.py and
benchmarks/failure_injection.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml

from mlci_dagster.definitions import build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.providers.ports import port_is_free
from mlci_dagster.providers.processes import marked_processes
from mlci_dagster.sensors.cleanup import sandbox_janitor, teardown_after_failure
from mlci_dagster.vocabulary import STAGES

PY = sys.executable
MARKER = "mlci-injected-run"
KEY = "inject|e1"

SLOW_SERVER = '''
import http.server, signal, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so teardown has to wait, then SIGKILL
time.sleep(delay)  # a slow start keeps the sandbox stage busy
class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(8 if self.path == "/slow" else 0)
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.ThreadingHTTPServer(("127.0.0.1", port), Slow).serve_forever()
'''


def write_registry(root: Path) -> Path:
    """Config `inject`: every stage takes a few seconds, so a kill lands inside it."""
    (root / "configs").mkdir(parents=True)
    (root / "slow_server.py").write_text(SLOW_SERVER)
    (root / "mlci.yaml").write_text(yaml.safe_dump({"engines": {"e1": {}}}))
    config = {
        "name": "inject", "owners": {"default": "ops"},
        "image": {"build": {"command": [PY, "-c", "import time; time.sleep(4)", MARKER],
                            "inputs": ["slow_server.py"]}},
        "sandbox": {"services": [{
            "name": "web", "command": [PY, str(root / "slow_server.py"), "${port}", "3"],
            "ready": {"http": {"path": "/"}}}]},
        "pipelines": [{"kind": "command", "name": "train", "command": [
            PY, "-c", "import subprocess, time; subprocess.Popen(['sleep', '600']); "
            "time.sleep(4)", MARKER]}],
        "ui_smoke": {"routes": [{"service": "web", "path": "/slow", "timeout_s": 20}]},
    }
    (root / "configs" / "inject.yaml").write_text(yaml.safe_dump(config))
    return root


def injected_processes() -> list[int]:
    """Builds and pipelines of the injected config still alive (their argv carries MARKER)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if MARKER in (proc.info["cmdline"] or []) and \
                    proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def stage_in_progress(instance: dg.DagsterInstance, run_id: str, stage: str) -> bool:
    """Whether `stage` has begun in the run: the stage before it is materialized (the image
    stage: the lifecycle step has started)."""
    if stage == STAGES[0]:
        return any(instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START))
    previous = str(STAGES[STAGES.index(stage) - 1])
    return any(e.asset_materialization and e.asset_materialization.asset_key.to_user_string()
               == previous for e in instance.all_logs(
                   run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION))


def leaks(home: Path, handles: list[dict], sandbox_ids: set[str]) -> dict[str, list]:
    return {
        "processes": [p for s in sandbox_ids for p in marked_processes("MLCI_SANDBOX_ID", s)],
        "orphans": injected_processes(),
        "ports": [p for h in handles for p in h["ports"].values() if not port_is_free(p)],
        "directories": [str(d) for d in (home / "mlci").glob("sandboxes/*")],
        "ledger": [p.name for p in (home / "mlci").glob("ledger/*.json")],
    }


def inject(stage: str, home: Path, registry: Path, timeout_s: float = 60) -> dict[str, Any]:
    """SIGKILLs the lifecycle's worker mid-`stage`, runs the cleanup layers; returns what was
    left before and after them, and how the run and its results ended."""
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    run_id = str(uuid.uuid4())
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("config", ["inject"])
        worker = subprocess.Popen(
            [PY, "-m", "mlci_dagster.runner", str(registry), KEY, run_id, "manual"],
            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not (instance.has_run(run_id) and stage_in_progress(instance, run_id, stage)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage {stage} never started")
                time.sleep(0.1)
            time.sleep(1.0)  # well inside the stage
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        time.sleep(0.5)  # let pdeathsig take the build or pipeline down with the worker
        handles = [yaml.safe_load(p.read_text()) for p in (home / "mlci").glob("ledger/*.json")]
        sandbox_ids = {p.name for p in (home / "mlci").glob("logs/*")}
        left_by_crash = leaks(home, handles, sandbox_ids)

        resources = build_definitions(registry).resources
        # Layer 2: the janitor ends the run whose worker is gone and reaps its sandboxes.
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            sandbox_janitor(context)
        # Layer 3: the failure sensor, as the daemon runs it for the now failed run.
        run = instance.get_run_by_id(run_id)
        failure = next(iter(instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)),
                       None)
        if failure is not None and failure.dagster_event is not None:
            with dg.build_run_status_sensor_context(
                    sensor_name="teardown_after_failure", dagster_event=failure.dagster_event,
                    dagster_instance=instance, dagster_run=run,
                    resources=resources) as context:
                teardown_after_failure(context.for_run_failure())
        left = leaks(home, handles, sandbox_ids)
        results = instance.fetch_materializations(RESULTS_ASSET, limit=5).records
    for pid in left["processes"] + left["orphans"]:  # leave the machine clean regardless
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return {"stage": stage, "sandboxes": len(sandbox_ids),
            "left_by_crash": sum(len(v) for v in left_by_crash.values()),
            "leaks": sum(len(v) for v in left.values()), "details": left,
            "run_status": run.status if run else None, "results": len(results)}
