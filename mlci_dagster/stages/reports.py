"""The test reports a pipeline declares, collected when it ends, pass or fail: each found by its
path (a glob) on this machine, read (junit/read.py), and kept in the run's log directory, where
it outlives the sandbox. What cannot be found or read is a problem naming the pipeline, the
report and the file; every other result of the run is kept."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path
from typing import Any

from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.junit.read import read_report
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.registry.models import CommandPipeline
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.details import PipelineTests

MAX_REPORT_FILES = 100  # per declared report: a glob that matches more is cut, and says so


def collect_local_reports(ctx: LifecycleContext, handle: SandboxHandle,
                          pipeline: CommandPipeline, context: dict[str, Any]) -> PipelineTests:
    """The reports of a pipeline that ran on this machine, in the sandbox's work directory."""
    tests = PipelineTests()
    kept = Path(handle.log_dir) / "reports" / pipeline.name
    for i, spec in enumerate(pipeline.reports):
        where = f"pipeline '{pipeline.name}': reports[{i}]"
        try:
            pattern = render(spec.path, context)
        except TemplateError as exc:
            tests.problems.append(f"{where}: {exc}")
            continue
        found = sorted(glob.glob(str(Path(handle.workdir) / pattern)))  # an absolute one stays
        if not found:
            tests.problems.append(f"{where}: no report at {pattern} (the pipeline ended "
                                  "before writing it, or wrote it elsewhere)")
        if len(found) > MAX_REPORT_FILES:
            tests.problems.append(f"{where}: {len(found)} files match {pattern}; the first "
                                  f"{MAX_REPORT_FILES} are read")
        for path in map(Path, found[:MAX_REPORT_FILES]):
            report = read_report(path, ctx.redactor)
            tests.add(pipeline.name, report.cases)
            if report.problem is not None:
                tests.problems.append(f"{where}: {report.problem}")
            tests.reports.append(_keep(path, kept / f"{i}-{path.name}"))
    return tests


def _keep(path: Path, copy: Path) -> str:
    """A copy in the run's log directory (the sandbox's work directory goes with it)."""
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    except OSError:
        return str(path)
    return str(copy)
