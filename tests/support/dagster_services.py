"""A real `dagster-daemon` and `dagster-webserver` on a DAGSTER_HOME, for tests and benchmarks:
each in its own process group, stopped whole on exit; and the webserver's GraphQL API, called
as the Dagster UI calls it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.providers.ports import allocate_free_port
from tests.support.loopback import background

VENV_BIN = Path(sys.executable).parent
# What the UI's Launch / Materialize buttons send: a run.
LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
# What the UI's "Materialize" → partitions dialog sends: an asset backfill.
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               log: Path | None = None, interval_s: float = 0.3) -> Any:
    """The predicate's first truthy value; AssertionError with the log's tail at the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.ConnectionError):
            if value := predicate():
                return value
        time.sleep(interval_s)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}\n{tail}")


def service_env(dagster_home: Path, registry: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(dagster_home), "MLCI_REGISTRY": str(registry)}


def start_sensor(dagster_home: Path, registry: Path, name: str) -> None:
    """Turns on a sensor that is off by default (the stale scanner), as its toggle in the UI
    does: `dagster sensor start` on the home, so a daemon started after ticks it."""
    done = subprocess.run([str(VENV_BIN / "dagster"), "sensor", "start", "-m",
                           "mlci_dagster.definitions", name],
                          env=service_env(dagster_home, registry), capture_output=True,
                          text=True, timeout=180)
    if done.returncode != 0:
        raise AssertionError(f"dagster sensor start {name}: {done.stdout}{done.stderr}")


@contextlib.contextmanager
def daemon(dagster_home: Path, registry: Path, log: Path) -> Iterator[subprocess.Popen]:
    argv = [str(VENV_BIN / "dagster-daemon"), "run", "-m", "mlci_dagster.definitions"]
    with background(argv, log, service_env(dagster_home, registry)) as proc:
        yield proc


@contextlib.contextmanager
def webserver(dagster_home: Path, registry: Path, log: Path) -> Iterator[str]:
    """A webserver on a free loopback port; yields its base URL once it answers."""
    port = allocate_free_port()
    argv = [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
            "-m", "mlci_dagster.definitions"]
    with background(argv, log, service_env(dagster_home, registry)):
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{url}/server_info", timeout=2).ok, 120,
                   "the webserver", log)
        yield url


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST /graphql as the UI does; the `data`, or AssertionError naming the errors. (A
    mutation that raised answers HTTP 500 with its PythonError in `data`: that is data.)"""
    response = requests.post(f"{url}/graphql", json={"query": query,
                                                     "variables": variables or {}}, timeout=60)
    body = response.json()
    if body.get("errors") or not body.get("data"):
        raise AssertionError(f"GraphQL {response.status_code}: {body.get('errors')}")
    return body["data"]
