"""Readiness probes (HTTP, TCP, command) polled until ready, a deadline, or the service's exit."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import requests

from mlci_dagster.providers.ports import HOST
from mlci_dagster.registry.models import ProbeSpec


@dataclass
class ProbeResult:
    service: str
    kind: str
    ready: bool
    attempts: int
    elapsed_s: float
    last_error: str = ""
    timed_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_once(spec: ProbeSpec, port: int, env: dict[str, str], cwd: str) -> str | None:
    """One attempt: None when ready, else why not."""
    if spec.http is not None:
        url = f"http://{HOST}:{port}{spec.http.path}"
        try:
            status = requests.get(url, timeout=2).status_code
        except requests.RequestException as exc:
            return f"GET {url}: {type(exc).__name__}"
        return None if status == spec.http.expect_status else (
            f"GET {url}: status {status}, expected {spec.http.expect_status}")
    if spec.tcp:
        try:
            with socket.create_connection((HOST, port), timeout=2):
                return None
        except OSError as exc:
            return f"tcp {HOST}:{port}: {exc.strerror or exc}"
    assert spec.command is not None
    try:
        done = subprocess.run(spec.command, cwd=cwd, env=env, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"probe command: {exc}"
    return None if done.returncode == 0 else (
        f"probe command exited {done.returncode}: {done.stderr.decode(errors='replace')[-200:]}")


def wait_until_ready(
    service: str,
    spec: ProbeSpec,
    port: int,
    *,
    env: dict[str, str],
    cwd: str,
    deadline: float,
    exited: Callable[[], str | None],
) -> ProbeResult:
    """Polls until ready, until min(probe timeout, `deadline`), or until `exited()` says why not."""
    kind = "http" if spec.http else "tcp" if spec.tcp else "command"
    start = time.monotonic()
    stop = min(start + (spec.timeout_s or float("inf")), deadline)
    attempts = 0
    while True:
        attempts += 1
        error = probe_once(spec, port, env, cwd)
        elapsed = time.monotonic() - start
        if error is None:
            return ProbeResult(service, kind, True, attempts, elapsed)
        gone = exited()
        if gone:
            return ProbeResult(service, kind, False, attempts, elapsed, gone)
        if time.monotonic() + spec.interval_s > stop:
            return ProbeResult(service, kind, False, attempts, elapsed, error, timed_out=True)
        time.sleep(spec.interval_s)
