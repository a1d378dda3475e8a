"""Per-test history figures at the scale of a large nightly matrix: 50 partitions × 2,000 tests ×
30 batches (3 million rows).

1. Reading a 2,000-case JUnit report (pytest's shape, 40 failures). Goal ≤ 1 s.
2. Consolidation as the `test_history` asset does it, batch by batch: each batch's 50 runs
   appended to the stored table (categoricals merged). Printed per batch, last one shown.
3. The per-test analysis over the 3 million rows (status, failing streak and range, flips,
   slowdowns, new and vanished). Goal ≤ 5 s.
4. The grid page with every partition's drill-down. Goal ≤ 2 s to write.
5. The stored table, pickled as the filesystem IO manager stores it. Goal ≤ 100 MB.
6. Peak RSS of a process that reads a 100,000-case report (1,000 failing, one message of
   50 MB), sums it up as the pipeline stage does, keeps it as JUnit and makes its history rows.
   Goal ≤ 300 MB.

Run: .venv/bin/python -m benchmarks.test_history
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlci_dagster.history.analysis import analyze
from mlci_dagster.history.case_analysis import analyze_cases
from mlci_dagster.history.cases import append_cases, case_rows
from mlci_dagster.history.grid import write_grid
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.junit.read import TestCase, TestStatus, read_report
from mlci_dagster.registry.models import HistorySettings

PARTITIONS, TESTS, BATCHES = 50, 2_000, 30
NOW = time.time()


def junit(cases: int, failing: int, huge_message: bool = False) -> str:
    """A report in pytest's shape: `failing` of `cases` fail with a traceback."""
    lines = ['<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
             f'<testsuite name="pytest" tests="{cases}">']
    for i in range(cases):
        name = f'test_case_{i}[param-{i % 7}]'
        if i < failing:
            body = "x" * (50 * 1024 * 1024) if huge_message and i == 0 else (
                f"def test():\n&gt;  assert {i} == 0\nE  AssertionError\n"
                f"module.py:{i}: AssertionError")
            lines.append(f'<testcase classname="tests.test_module_{i % 40}" name="{name}" '
                         f'time="0.{i % 1000:03d}"><failure message="AssertionError: assert {i} '
                         f'== 0">{body}</failure></testcase>')
        else:
            lines.append(f'<testcase classname="tests.test_module_{i % 40}" name="{name}" '
                         f'time="0.{i % 1000:03d}" />')
    lines.append("</testsuite></testsuites>")
    return "\n".join(lines)


def record(partition: int, batch: int) -> ResultRecord:
    key = f"config-{partition // 2:02d}|engine-{partition % 2}"
    config, engine = key.split("|")
    started = NOW - (BATCHES - batch) * 86_400
    return ResultRecord.model_validate({
        "partition": key, "config": config, "engine": engine, "config_id": "c1",
        "status": "pass", "image_digest": f"sha256:{batch // 10:064x}", "code_version": "v1",
        "trigger": "schedule", "run_id": f"run-{partition}-{batch}", "started_at": started,
        "finished_at": started + 600, "duration_s": 600.0, "batch": f"nightly {batch}",
        "stages": {"image": {"status": "pass", "duration_s": 1.0}}})


def cases_of(partition: int, batch: int, rng: random.Random) -> list[TestCase]:
    """2,000 tests: a few broken from batch 20 on, a few flaky, one slow, one new, one gone."""
    cases = []
    for t in range(TESTS):
        if (t == TESTS - 1 and batch < BATCHES - 1) or (t == TESTS - 2 and batch == BATCHES - 1):
            continue  # one test new in the last batch, one vanished from it
        broken = t < 5 and batch >= 20 and partition % 5 == 0
        flaky = 5 <= t < 10 and rng.random() < 0.3
        status = TestStatus.FAIL if broken or flaky else TestStatus.PASS
        duration = 3.0 if t == 10 and batch == BATCHES - 1 else 1.0 + rng.random() * 0.05
        cases.append(TestCase("pytest", f"tests.test_module_{t % 40}", f"test_{t}[p]", status,
                              duration, message="AssertionError: assert 1 == 0"
                              if status is TestStatus.FAIL else "",
                              signature="a1b2c3d4e5f6" if status is TestStatus.FAIL else ""))
    return cases


INGEST = """
import sys
from pathlib import Path
from mlci_dagster.history.cases import case_rows
from mlci_dagster.junit.read import read_report
from mlci_dagster.junit.write import by_suite, suite_element, write_junit
from mlci_dagster.stages.details import PipelineTests
from benchmarks.test_history import record
report = read_report(Path(sys.argv[1]))
tests = PipelineTests()
tests.add("suite", report.cases)
write_junit(Path(sys.argv[2]), [suite_element(n, c) for n, c in by_suite(report.cases).items()])
rows = case_rows(record(0, 0), 1, "suite", report.cases)
# VmHWM: this process's own peak since its exec (ru_maxrss would count the parent's pages the
# fork shared before it).
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:"))
print(peak_kb, len(report.cases), tests.counts.failed, tests.failing_total, len(rows))
"""


def main() -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report = root / "report.xml"
        report.write_text(junit(2_000, 40))
        start = time.perf_counter()
        parsed = read_report(report)
        print(f"1. read a 2,000-case report ({report.stat().st_size / 1e6:.2f} MB): "
              f"{time.perf_counter() - start:.3f} s ({len(parsed.cases)} cases, "
              f"{sum(c.failed for c in parsed.cases)} failing)  [goal ≤ 1 s]")

        table, history, storage, last_append = None, None, 0, 0.0
        for batch in range(BATCHES):
            frames, rows = [], []
            for partition in range(PARTITIONS):
                storage += 1
                run = record(partition, batch)
                rows.append(record_to_row(run, storage))
                frames.append(case_rows(run, storage, "tests", cases_of(partition, batch, rng)))
            start = time.perf_counter()
            table = append_cases(table, frames)
            last_append = time.perf_counter() - start
            history = append_rows(history, rows)
        print(f"2. consolidation: the last batch's 50 runs (100,000 rows) appended to "
              f"{len(table) - 100_000:,} rows in {last_append:.2f} s")

        start = time.perf_counter()
        tests = analyze_cases(table, HistorySettings())
        analysis_s = time.perf_counter() - start
        states = {}
        for t in tests:
            states[str(t.state)] = states.get(str(t.state), 0) + 1
        print(f"3. per-test analysis of {len(table):,} rows, {len(tests):,} tests: "
              f"{analysis_s:.2f} s {states}, {sum(t.slower_by > 0 for t in tests)} slow, "
              f"{sum(t.new for t in tests)} new  [goal ≤ 5 s]")

        summaries = analyze(history, sorted(history["partition"].unique()), HistorySettings(),
                            NOW)
        start = time.perf_counter()
        page = write_grid(history, summaries, root / "grid", tests, table)
        print(f"4. grid page with drill-downs: {time.perf_counter() - start:.2f} s "
              f"({page.stat().st_size / 1e6:.1f} MB)  [goal ≤ 2 s]")

        stored = len(pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL))
        print(f"5. stored table (pickle, as the IO manager stores it): {stored / 1e6:.1f} MB "
              f"[goal ≤ 100 MB]")

        big = root / "big.xml"
        big.write_text(junit(100_000, 1_000, huge_message=True))
        done = subprocess.run([sys.executable, "-c", INGEST, str(big), str(root / "kept.xml")],
                              capture_output=True, text=True, check=True)
        peak_kb, *counts = done.stdout.split()
        print(f"6. ingest a 100,000-case report ({big.stat().st_size / 1e6:.0f} MB, a 50 MB "
              f"message): peak RSS {int(peak_kb) / 1024:.0f} MB; cases, failed, failing, "
              f"rows = {counts}  [goal ≤ 300 MB]")


if __name__ == "__main__":
    main()
