"""The test reports a pipeline declares, collected when it ends, pass or fail: each found by its
path (a glob), on this machine for a `command` pipeline, else fetched by the sandbox's provider
from where the pipeline ran (`Provider.report_files`), and read (junit/read.py). What they say
is kept as one JUnit XML per pipeline in the run's log directory, where it outlives the
sandbox: every case, its names and message redacted and bounded (a raw report may hold a
secret, and cannot be redacted as text without breaking its XML). What cannot be found,
fetched or read is a problem naming the pipeline, the report and the file; every other result
of the run is kept."""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path
from typing import Any

from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.junit.read import TestCase, read_report
from mlci_dagster.junit.write import by_suite, suite_element, write_junit
from mlci_dagster.paths import run_log_dir
from mlci_dagster.providers.base import MAX_REPORT_FILES, ReportError
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.registry.base import ReportingPipeline
from mlci_dagster.registry.models import CommandPipeline
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.details import PipelineTests


def collect_reports(ctx: LifecycleContext, handle: SandboxHandle, pipeline: ReportingPipeline,
                    context: dict[str, Any]) -> PipelineTests:
    """What the pipeline's reports say, kept; fetched copies go when it returns."""
    tests = PipelineTests()
    cases: list[TestCase] = []
    with tempfile.TemporaryDirectory(prefix="mlci-reports-") as fetched:
        for i, spec in enumerate(pipeline.reports):
            where = f"pipeline '{pipeline.name}': reports[{i}]"
            try:
                pattern = render(spec.path, context)
                found = local_report_files(handle, pattern) \
                    if isinstance(pipeline, CommandPipeline) else \
                    ctx.provider.report_files(handle, pipeline, pattern, Path(fetched) / str(i))
            except (TemplateError, ReportError) as exc:
                tests.problems.append(f"{where}: {exc}")
                continue
            if not found:
                tests.problems.append(f"{where}: no report at {pattern} (the pipeline ended "
                                      "before writing it, or wrote it elsewhere)")
            if len(found) > MAX_REPORT_FILES:
                tests.problems.append(f"{where}: {len(found)} files match {pattern}; the first "
                                      f"{MAX_REPORT_FILES} are read")
            for path in found[:MAX_REPORT_FILES]:
                report = read_report(path, ctx.redactor)
                cases += report.cases
                if report.problem is not None:
                    tests.problems.append(f"{where}: {report.problem}")
    tests.add(pipeline.name, cases)
    if cases:
        kept = report_path(ctx.home, ctx.run_id, pipeline.name)
        try:
            write_junit(kept, [suite_element(name, suite) for name, suite in
                               by_suite(cases).items()], name=pipeline.name)
            tests.report = str(kept)
        except OSError as exc:
            tests.problems.append(f"pipeline '{pipeline.name}': its tests could not be kept "
                                  f"at {kept}: {exc}")
    return tests


def local_report_files(handle: SandboxHandle, pattern: str) -> list[Path]:
    """The files matching `pattern` on this machine: absolute, or under the sandbox's work
    directory (where a `command` pipeline runs)."""
    return [Path(p) for p in sorted(glob.glob(str(Path(handle.workdir) / pattern)))]


def report_path(home: Path, run_id: str, pipeline: str) -> Path:
    """Where a run keeps what one pipeline's test reports say."""
    return run_log_dir(home, run_id) / "tests" / f"{pipeline}.xml"
