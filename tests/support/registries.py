"""Test registries written on the fly: the config, service and pipeline bodies tests start
from (`config`, `http_service`, `command_pipeline`), the registry directory they go into
(`write_registry`), and a registry whose config leaks a secret (`leaky_registry`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

PY = sys.executable


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
