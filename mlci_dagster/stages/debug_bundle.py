"""The debug bundle of a failed lifecycle: service and pipeline logs, probe results, the sandbox
handle, the earlier stages' outcomes and the pipelines' test results (as kept: JUnit XML) in
one tar.gz, written before the sandbox is destroyed. Every member is redacted, even the logs
that were redacted when written; the test results were redacted case by case when kept."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from mlci_dagster.common.redact import Redactor
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.stages.outcome import StageOutcome
from mlci_dagster.vocabulary import Stage

# A runaway log must not fill the disk twice: the bundle keeps each log's tail.
LOG_TAIL_BYTES = 5_000_000


def bundle_path(home: Path, run_id: str, config: str, engine: str) -> Path:
    return home / "bundles" / run_id / f"{config}.{engine}.tar.gz"


def _add(tar: tarfile.TarFile, name: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _log_tail(path: Path) -> str:
    with path.open("rb") as log:
        log.seek(0, os.SEEK_END)
        size = log.tell()
        log.seek(max(0, size - LOG_TAIL_BYTES))
        text = log.read().decode("utf-8", errors="replace")
    cut = size - LOG_TAIL_BYTES
    return text if cut <= 0 else f"[... first {cut} bytes cut]\n{text}"


def test_reports_of(outcomes: list[StageOutcome]) -> dict[str, str]:
    """pipeline -> the JUnit XML the run kept of its tests."""
    return {name: tests.report for o in outcomes if o.stage is Stage.PIPELINE_RUNS
            for name, tests in o.details.tests.items() if tests.report}


def screenshots_of(outcomes: list[StageOutcome], travelling: bool = False) -> list[str]:
    """The screenshots ui_smoke's browser checks took; with `travelling`, only those that may
    leave the machine (their route and the artifact settings allow it)."""
    return [route.screenshot for o in outcomes if o.stage is Stage.UI_SMOKE
            for route in o.details.routes
            if route.screenshot and (route.screenshot_travels or not travelling)]


def write_debug_bundle(
    path: Path, handle: SandboxHandle, outcomes: list[StageOutcome], logs: list[str],
    redactor: Redactor,
) -> Path:
    """Writes the bundle at `path` (atomically) and returns it; OSError if it cannot. The
    browser checks' screenshots go in as they are (an image cannot be redacted), except those
    kept on the machine (`upload_screenshot: false`): the bundle travels."""
    root = path.name.removesuffix(".tar.gz")
    sandbox = next((o for o in outcomes if o.stage is Stage.SANDBOX), None)
    documents: dict[str, Any] = {
        "handle.json": handle.to_dict(),
        "probes.json": sandbox.details.probes if sandbox else [],
        "outcomes.json": {str(o.stage): o.to_dict() for o in outcomes},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, document in documents.items():
            _add(tar, f"{root}/{name}", json.dumps(redactor.value(document), indent=2))
        for log in logs:
            try:
                _add(tar, f"{root}/logs/{Path(log).name}", redactor.text(_log_tail(Path(log))))
            except OSError as exc:
                _add(tar, f"{root}/logs/{Path(log).name}.missing", f"could not read {log}: {exc}")
        for pipeline, report in test_reports_of(outcomes).items():
            try:  # whole: a JUnit file cut at its tail is no longer XML
                _add(tar, f"{root}/tests/{pipeline}.xml", Path(report).read_bytes())
            except OSError as exc:
                _add(tar, f"{root}/tests/{pipeline}.xml.missing", f"could not read {report}: {exc}")
        travelling = set(screenshots_of(outcomes, travelling=True))
        for shot in screenshots_of(outcomes):
            name = f"{root}/screenshots/{Path(shot).name}"
            if shot not in travelling:
                _add(tar, f"{name}.kept-local",
                     f"not in the bundle (its route's upload_screenshot is off): {shot}")
                continue
            try:
                _add(tar, name, Path(shot).read_bytes())
            except OSError as exc:
                _add(tar, f"{name}.missing", f"could not read {shot}: {exc}")
    tmp.replace(path)
    return path
