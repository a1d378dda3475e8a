"""A batch's results as one JUnit XML for the CI system that ran `mlci run` (GitHub Actions,
Buildkite, GitLab render it natively): a `<testsuite>` per partition, holding a testcase per
lifecycle stage and one per test its pipelines reported."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from xml.etree.ElementTree import Element

from mlci_dagster.history.record import ResultRecord
from mlci_dagster.junit.read import TestCase, TestStatus, read_report
from mlci_dagster.junit.write import suite_element, write_junit

STAGE_STATUS = {"pass": TestStatus.PASS, "fail": TestStatus.FAIL, "skip": TestStatus.SKIP}


def latest_batch(records: Iterable[ResultRecord]) -> list[ResultRecord]:
    """The batch of the newest record: each partition's latest record in it."""
    records = sorted(records, key=lambda r: r.finished_at)
    if not records:
        return []
    batch = records[-1].batch
    latest = {r.partition: r for r in records if r.batch == batch}
    return [latest[p] for p in sorted(latest)]


def partition_cases(record: ResultRecord) -> tuple[list[TestCase], list[str]]:
    """The record's stages, then its pipelines' tests (read from where the run kept them), as
    test cases; and each kept report that could not be read."""
    cases = [TestCase(record.partition, "lifecycle", str(stage),
                      STAGE_STATUS.get(str(outcome.status), TestStatus.SKIP), outcome.duration_s,
                      message=outcome.error_summary)
             for stage, outcome in record.stages.items()]
    problems = []
    for pipeline, path in record.test_reports.items():
        report = read_report(Path(path))
        if report.problem is not None:
            problems.append(f"{record.partition} '{pipeline}': {report.problem}")
        cases += [TestCase(record.partition, f"{pipeline}.{case.classname}", case.name,
                           case.status, case.duration_s, case.message, case.signature,
                           case.flaky) for case in report.cases]
    return cases, problems


def write_batch_junit(path: Path, records: list[ResultRecord]) -> tuple[Path, list[str]]:
    """Writes the records as JUnit XML at `path`: (the path, the reports it could not read)."""
    suites: list[Element] = []
    problems: list[str] = []
    for record in records:
        cases, unread = partition_cases(record)
        problems += unread
        suites.append(suite_element(record.partition, cases, timestamp=_iso(record.started_at)))
    name = f"mlci {records[0].batch}" if records else "mlci"
    return write_junit(path, suites, name=name), problems


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S")
