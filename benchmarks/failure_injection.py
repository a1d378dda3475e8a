"""Failure injection: SIGKILL of the run's process in the middle of each stage in turn, then
the cleanup layers outside the run (the run-failure sensor, as after Dagster's run monitoring
marks the run failed, then the janitor). Prints the leaks found per injected stage (goal: 0):
processes, busy ports, work directories and ledger entries of the sandbox, and orphaned
image-build or pipeline processes.

Run: .venv/bin/python -m benchmarks.failure_injection
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from mlci_dagster.definitions import build_definitions
from mlci_dagster.providers.ports import port_is_free
from mlci_dagster.sensors.cleanup import sandbox_janitor, teardown_after_failure

PY = sys.executable
STAGES = ["image", "sandbox", "pipeline_runs", "ui_smoke", "teardown"]
MARKER = "mlci-injected-run"

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


def marked_processes() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if MARKER.encode() in Path(entry.path, "cmdline").read_bytes():
                    stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                    if stat[0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def sandbox_processes(sandbox_ids: set[str]) -> list[int]:
    needles = {f"MLCI_SANDBOX_ID={s}".encode() for s in sandbox_ids}
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                environ = set(Path(entry.path, "environ").read_bytes().split(b"\0"))
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if environ & needles and stat[0] != "Z":
                found.append(int(entry.name))
    return found


def wait_for_step(instance: dg.DagsterInstance, stage: str, timeout_s: float = 60
                  ) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in instance.get_runs():
            started = {e.step_key for e in instance.all_logs(
                run.run_id, of_type=dg.DagsterEventType.STEP_START)}
            if stage in started:
                return run
        time.sleep(0.1)
    raise TimeoutError(f"stage {stage} never started")


def inject(stage: str, home: Path, registry: Path) -> dict[str, Any]:
    """Kills the run's process mid-`stage`, runs the cleanup layers; returns what leaked."""
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("config", ["inject"])
        runner = subprocess.Popen(
            [PY, "-c", "import sys; from mlci_dagster.cli import execute_partition; "
             "execute_partition(sys.argv[1], 'inject|e1', 'manual')", str(registry)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = None
        try:
            run = wait_for_step(instance, stage)
            time.sleep(1.0)  # well inside the stage
        finally:
            runner.send_signal(signal.SIGKILL)
            runner.wait()
            if run is None:  # the stage never started: still leave nothing behind
                with dg.build_sensor_context(instance=instance, resources=build_definitions(
                        registry).resources) as context:
                    sandbox_janitor(context)
        time.sleep(0.5)  # let pdeathsig take the build or pipeline down with the run
        handles = [yaml.safe_load(p.read_text()) for p in (home / "mlci").glob("ledger/*.json")]
        sandbox_ids = {p.name for p in (home / "mlci").glob("logs/*")}
        left_by_crash = leaks(home, handles, sandbox_ids)

        # Layer 2: Dagster's run monitoring marks the dead run failed; the failure sensor runs.
        resources = build_definitions(registry).resources
        failure = instance.report_run_failed(run, "run worker killed (failure injection)")
        with dg.build_run_status_sensor_context(
                sensor_name="teardown_after_failure", dagster_event=failure,
                dagster_instance=instance, dagster_run=instance.get_run_by_id(run.run_id),
                resources=resources) as context:
            teardown_after_failure(context.for_run_failure())
        # Layer 3: the janitor, for anything still left.
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            sandbox_janitor(context)

        left = leaks(home, handles, sandbox_ids)
    for pid in left["processes"] + left["orphans"]:  # leave the machine clean regardless
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return {"stage": stage, "sandboxes": len(sandbox_ids),
            "left_by_crash": sum(len(v) for v in left_by_crash.values()),
            "leaks": sum(len(v) for v in left.values()), "details": left}


def leaks(home: Path, handles: list[dict], sandbox_ids: set[str]) -> dict[str, list]:
    return {
        "processes": sandbox_processes(sandbox_ids),
        "orphans": marked_processes(),
        "ports": [p for h in handles for p in h["ports"].values() if not port_is_free(p)],
        "directories": [str(d) for d in (home / "mlci").glob("sandboxes/*")],
        "ledger": [p.name for p in (home / "mlci").glob("ledger/*.json")],
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        registry = write_registry(Path(tmp) / "registry")
        print(f"{'injected stage':<16}{'sandboxes':>10}{'left by crash':>15}"
              f"{'leaks after cleanup':>21}")
        for stage in STAGES:
            result = inject(stage, Path(tmp) / f"home-{stage}", registry)
            print(f"{stage:<16}{result['sandboxes']:>10}{result['left_by_crash']:>15}"
                  f"{result['leaks']:>21}" + (f"  {result['details']}" if result["leaks"] else ""),
                  flush=True)


if __name__ == "__main__":
    main()
