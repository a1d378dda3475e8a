"""JUnit XML from real producers (pytest, JUnit 5 on the JVM), and every bad report a pipeline
can leave: each read to a clear problem naming the file, in bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from junitparser import JUnitXml

from mlci_dagster.common.redact import Redactor
from mlci_dagster.definitions import HISTORY_JOB, build_definitions
from mlci_dagster.history.record import MAX_FAILING_TESTS, FailingTest, TestCounts
from mlci_dagster.junit.read import MAX_MESSAGE_CHARS, TestCase, TestStatus, read_report
from mlci_dagster.junit.write import by_suite, suite_element, write_junit
from mlci_dagster.notify.message import signature_notification
from mlci_dagster.stages.details import PipelineTests
from tests.support.registries import PY, command_pipeline, config, write_registry
from tests.support.runs import QUIET, result_record, run_partition, stage_details
from tests.support.services import JUNIT5, JUNIT5_CONSOLE, needs

FIXTURES = Path(__file__).parent / "fixtures" / "junit"


def mlci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlci_dagster.cli", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ)


def statuses(report) -> dict[str, str]:
    return {case.name: str(case.status) for case in report.cases}


def test_a_pytest_report_gives_each_case_its_status_message_and_whole_name():
    report = read_report(FIXTURES / "pytest-9.2.0.xml")

    assert report.problem is None
    assert statuses(report) == {
        "test_loss_decreases": "pass", "test_accuracy_reaches_the_bar": "fail",
        "test_experiment_is_listed": "error", "test_trains_on_the_gpu": "skip",
        "test_backend_name_round_trips[sqlite]": "pass",
        "test_backend_name_round_trips[postgres|14]": "pass",
        "test_backend_name_round_trips[a/b <c>]": "pass",
        "test_checkpoint_is_bitwise_equal": "skip"}
    failed = {case.name: case for case in report.cases if case.failed}
    accuracy = failed["test_accuracy_reaches_the_bar"]
    assert accuracy.message.startswith("AssertionError: accuracy 0.81 below 0.9")
    assert accuracy.id == "pytest :: test_model :: test_accuracy_reaches_the_bar"
    assert "ConnectionError: tracking server" in failed["test_experiment_is_listed"].message
    assert len({case.signature for case in failed.values()}) == 2
    assert all(case.signature == "" for case in report.cases if not case.failed)


def test_a_junit5_report_from_the_jvm_reads_the_same_way():
    report = read_report(FIXTURES / "junit5-console-1.9.1-jupiter-5.9.2.xml")

    assert report.problem is None
    assert statuses(report) == {
        "batchSizeIsPositive(int)[1]": "pass", "batchSizeIsPositive(int)[2]": "pass",
        "batchSizeIsPositive(int)[3]": "pass", "addsTwoNumbers()": "pass",
        "loadsTheModelRegistry()": "error", "trainsOnTheGpu()": "skip",
        "dividesByTheTrainedScale()": "fail"}
    error = next(c for c in report.cases if c.status is TestStatus.ERROR)
    assert error.message == ("java.lang.IllegalStateException: model registry at "
                             "http://127.0.0.1:5000 answered 503")
    assert {c.suite for c in report.cases} == {"JUnit Jupiter"}
    assert {c.classname for c in report.cases} == {"CalculatorTests"}


def test_a_report_pytest_writes_now_is_read(tmp_path):
    source = tmp_path / "test_live.py"
    shutil.copy(FIXTURES / "pytest_model_tests.py", source)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={tmp_path / 'report.xml'}", str(source)],
                   capture_output=True, cwd=tmp_path, timeout=120)

    report = read_report(tmp_path / "report.xml")

    assert report.problem is None
    assert sorted(str(c.status) for c in report.cases) == [
        "error", "fail", "pass", "pass", "pass", "pass", "skip", "skip"]


@needs(JUNIT5)
def test_a_report_the_junit5_console_launcher_writes_now_is_read(tmp_path):
    shutil.copy(FIXTURES / "CalculatorTests.java", tmp_path)
    subprocess.run(["javac", "-cp", str(JUNIT5_CONSOLE), "CalculatorTests.java"],
                   cwd=tmp_path, check=True, timeout=120)
    subprocess.run(["java", "-jar", str(JUNIT5_CONSOLE), "-cp", ".", "--select-class",
                    "CalculatorTests", "--reports-dir", "reports", "--disable-banner"],
                   cwd=tmp_path, capture_output=True, timeout=120)

    report = read_report(tmp_path / "reports" / "TEST-junit-jupiter.xml")

    assert report.problem is None
    assert sorted(str(c.status) for c in report.cases) == [
        "error", "fail", "pass", "pass", "pass", "pass", "skip"]


# --- bad reports ------------------------------------------------------------------------------

CASE = '<testcase classname="m" name="t{i}" time="0.1"/>'


def write(tmp_path: Path, text: str | bytes, name: str = "report.xml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_missing_report_is_a_problem_naming_the_file(tmp_path):
    report = read_report(tmp_path / "report.xml")

    assert report.cases == []
    assert str(report.problem) == f"{tmp_path / 'report.xml'}: could not be read: " \
                                  "No such file or directory"


def test_an_empty_report_is_a_problem(tmp_path):
    report = read_report(write(tmp_path, ""))

    assert str(report.problem).endswith("report.xml: empty file")


def test_a_truncated_report_keeps_the_cases_read_before_the_cut(tmp_path):
    whole = "<testsuite name='s'>" + "".join(CASE.format(i=i) for i in range(5)) + "</testsuite>"
    report = read_report(write(tmp_path, whole[:-40]))

    assert [c.name for c in report.cases] == ["t0", "t1", "t2", "t3"]
    assert "not well-formed XML at line 1" in report.problem.why
    assert report.problem.why.endswith("4 test cases read before it")


def test_a_file_that_is_not_junit_is_a_problem(tmp_path):
    report = read_report(write(tmp_path, "<html><body>502 Bad Gateway</body></html>"))

    assert "not JUnit XML" in report.problem.why


def test_an_empty_suite_is_no_problem(tmp_path):
    report = read_report(write(tmp_path, "<testsuites><testsuite name='s' tests='0'/>"
                                         "</testsuites>"))

    assert report.problem is None and report.cases == []


@pytest.mark.parametrize("doctype", [
    # billion laughs
    '<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>',
    # an external entity
    '<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
], ids=["billion-laughs", "external-entity"])
def test_an_xml_bomb_is_refused_not_expanded(tmp_path, doctype):
    report = read_report(write(tmp_path, f'<?xml version="1.0"?>{doctype}<testsuite name="s">'
                               '<testcase classname="m" name="&lol3;&xxe;"/></testsuite>'))

    assert report.cases == []
    assert "refused: DTDForbidden" in report.problem.why


def test_a_name_that_is_not_utf8_is_a_problem_naming_the_place(tmp_path):
    report = read_report(write(tmp_path, b'<testsuite name="s"><testcase classname="m" '
                                         b'name="caf\xe9"/></testsuite>'))

    assert report.cases == []
    assert "not well-formed XML at line 1, column" in report.problem.why


def test_a_report_in_latin1_says_so_and_is_read(tmp_path):
    report = read_report(write(tmp_path, '<?xml version="1.0" encoding="ISO-8859-1"?>'
                               '<testsuite name="s"><testcase classname="m" name="café"/>'
                               '</testsuite>'.encode("latin-1")))

    assert [c.name for c in report.cases] == ["café"]


def test_a_50_mb_message_is_cut_to_its_bound(tmp_path):
    huge = "x" * (50 * 1024 * 1024)
    report = read_report(write(tmp_path, f'<testsuite name="s"><testcase classname="m" '
                               f'name="t"><failure message="boom">{huge}</failure></testcase>'
                               '</testsuite>'))

    [case] = report.cases
    assert case.status is TestStatus.FAIL and case.message == "boom"
    report = read_report(write(tmp_path, f'<testsuite name="s"><testcase classname="m" '
                               f'name="t"><error>{huge}</error></testcase></testsuite>'))
    assert len(report.cases[0].message) == MAX_MESSAGE_CHARS


def test_a_secret_in_a_name_or_message_is_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TOKEN", "tok-12345678")
    report = read_report(write(tmp_path, '<testsuite name="s"><testcase classname="m" '
                               'name="test_login[tok-12345678]"><failure message="401 for '
                               'tok-12345678"/></testcase></testsuite>'),
                         Redactor.from_env(["MLFLOW_TOKEN"]))

    [case] = report.cases
    assert "tok-12345678" not in case.name + case.message + case.id
    assert case.name.startswith("test_login[") and "401 for" in case.message


def test_a_surefire_rerun_that_passed_is_flaky_and_passed(tmp_path):
    report = read_report(write(tmp_path, '<testsuite name="s"><testcase classname="m" name="t">'
                               '<flakyFailure message="timeout" type="java.io.IOException"/>'
                               '</testcase></testsuite>'))

    [case] = report.cases
    assert (case.status, case.flaky) == (TestStatus.PASS, True)


def test_nested_suites_name_their_own_cases(tmp_path):
    report = read_report(write(tmp_path, '<testsuites><testsuite name="a"><testsuite name="b">'
                               '<testcase classname="m" name="inner"/></testsuite>'
                               '<testcase classname="m" name="outer"/></testsuite>'
                               '</testsuites>'))

    assert [(c.suite, c.name) for c in report.cases] == [("b", "inner"), ("a", "outer")]


# --- reports collected from a lifecycle's pipelines ---------------------------------------------


def pytest_pipeline(name: str, suite: Path, report: str = "report.xml") -> dict:
    """A real pytest run in the sandbox's work directory, writing JUnit XML there."""
    return {"kind": "command", "name": name, "timeout_s": 60,
            "command": [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}", str(suite)],
            "reports": [{"path": "${sandbox.workdir}/" + report}]}


def test_a_pipelines_pytest_report_gives_the_record_its_tests(instance, dagster_home, tmp_path):
    suite = tmp_path / "suite" / "test_model.py"
    suite.parent.mkdir()
    shutil.copy(FIXTURES / "pytest_model_tests.py", suite)
    registry = write_registry(tmp_path / "reg", [config(
        "tested", pipelines=[pytest_pipeline("model-tests", suite)])])

    result, record = run_partition(instance, registry, "tested|e1")

    assert record["status"] == "fail-pipeline_runs"  # pytest exits 1: a test failed
    assert record["tests"] == {"passed": 4, "failed": 1, "errors": 1, "skipped": 2}
    assert record["failing_tests_total"] == 2
    # The failure says which tests first, then how the pipeline ended.
    assert record["error_summary"].splitlines()[0] == (
        "pipeline 'model-tests': 2 of 8 tests failing: test_accuracy_reaches_the_bar "
        "(AssertionError: accuracy 0.81 below 0.9), and 1 more; exited 1, expected 0")
    failing = {f["id"]: f for f in record["failing_tests"]}
    accuracy = failing["pytest :: suite.test_model :: test_accuracy_reaches_the_bar"]
    assert accuracy["pipeline"] == "model-tests" and accuracy["status"] == "fail"
    assert accuracy["message"].startswith("AssertionError: accuracy 0.81 below 0.9")
    assert len(accuracy["signature"]) == 12
    assert failing["pytest :: suite.test_model :: test_experiment_is_listed"]["status"] == "error"
    assert record["test_report_problems"] == []
    kept = stage_details(instance, result.run_id, "pipeline_runs")["tests"]["model-tests"][
        "report"]
    assert record["test_reports"] == {"model-tests": kept}
    # Every case, kept where it outlives the sandbox, as JUnit that reads back the same.
    again = read_report(Path(kept))
    assert again.problem is None and len(again.cases) == 8
    assert {c.id: c.signature for c in again.cases if c.failed} == {
        f["id"]: f["signature"] for f in record["failing_tests"]}
    # And in the debug bundle of the failed run, whole.
    with tarfile.open(record["debug_bundle"]) as bundle:
        [member] = [m for m in bundle.getnames() if m.endswith("/tests/model-tests.xml")]
        assert bundle.extractfile(member).read() == Path(kept).read_bytes()


def test_a_report_the_pipeline_never_wrote_is_a_problem_and_the_rest_is_kept(
        instance, dagster_home, tmp_path):
    crashes = command_pipeline("train", "raise SystemExit(3)",
                               reports=[{"path": "out/*.xml"}])
    registry = write_registry(tmp_path / "reg", [config("crashes", pipelines=[crashes])])

    _, record = run_partition(instance, registry, "crashes|e1")

    assert record["status"] == "fail-pipeline_runs"
    assert record["error_summary"].startswith("pipeline 'train': exited 3, expected 0")
    assert record["tests"] == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    assert record["test_report_problems"] == [
        "pipeline 'train': reports[0]: no report at out/*.xml (the pipeline ended before "
        "writing it, or wrote it elsewhere)"]


def test_a_broken_report_names_its_pipeline_and_file_and_the_other_reports_count(
        instance, dagster_home, tmp_path):
    writes = command_pipeline(
        "suite", "import pathlib; pathlib.Path('a.xml').write_text("
        "'<testsuite name=\"s\"><testcase classname=\"m\" name=\"ok\"/></testsuite>'); "
        "pathlib.Path('b.xml').write_text('<testsuite name=\"s\"><testcase')",
        reports=[{"path": "*.xml"}])
    registry = write_registry(tmp_path / "reg", [config("half", pipelines=[writes])])

    _, record = run_partition(instance, registry, "half|e1")

    assert record["status"] == "pass"  # a report is evidence, not the pipeline's verdict
    assert record["tests"]["passed"] == 1
    [problem] = record["test_report_problems"]
    assert problem.startswith("pipeline 'suite': reports[0]: ") and "/b.xml: not well-formed" \
        in problem


def test_a_notification_and_the_run_summary_name_the_failing_tests():
    failing = [FailingTest(pipeline="tests", id=f"pytest :: m :: test_{i}", status="fail",
                           message=f"AssertionError: {i} != 0\nassert {i} == 0", signature="s")
               for i in range(4)]
    record = result_record("a|e1", "fail-pipeline_runs", 1000.0).model_copy(update={
        "tests": TestCounts(passed=37, failed=4), "failing_tests": failing,
        "failing_tests_total": 4})

    notification = signature_notification([record], "")

    assert notification.facts["failing tests"] == (
        "4 of 41 tests failing: pytest :: m :: test_0 (AssertionError: 0 != 0), "
        "pytest :: m :: test_1 (AssertionError: 1 != 0), pytest :: m :: test_2 "
        "(AssertionError: 2 != 0), pytest :: m :: test_3 (AssertionError: 3 != 0)")
    assert record.failing_tests_text(limit=1).endswith("(AssertionError: 0 != 0), and 3 more")
    assert result_record("a|e1", "pass", 1.0).failing_tests_text() == ""


def test_cases_written_read_back_the_same_whatever_their_names_hold(tmp_path):
    names = ["test_x[a|b]", "test_y[a/b]", "<script>alert(1)</script>", "quote \" and ' &amp;",
             "ansi \x1b[31mred\x1b[0m"]
    cases = [TestCase("suite|1", "m/x", name, status, 1.5, message=f"why: {name}",
                      flaky=status is TestStatus.PASS)
             for name, status in zip(names, [TestStatus.PASS, TestStatus.FAIL, TestStatus.ERROR,
                                             TestStatus.SKIP, TestStatus.FAIL], strict=True)]

    path = write_junit(tmp_path / "out.xml", [suite_element(n, c) for n, c in
                                               by_suite(cases).items()], name="p")
    again = read_report(path)

    assert again.problem is None
    assert [(c.suite, c.classname, c.name, c.status, c.duration_s, c.flaky)
            for c in again.cases] == [
        (c.suite, c.classname, c.name.replace("\x1b", "\ufffd"), c.status, c.duration_s,
         c.flaky) for c in cases]
    assert again.cases[1].message == "why: test_y[a/b]"


def test_the_history_job_keeps_every_test_of_every_run(instance, dagster_home, tmp_path):
    """Two runs of a pytest pipeline, a test broken in the second: the history job's
    test_history holds a row per test per run, and its check names the regressed test."""
    suite = tmp_path / "suite" / "test_model.py"
    suite.parent.mkdir()
    source = (FIXTURES / "pytest_model_tests.py").read_text()
    suite.write_text(source.replace("accuracy = 0.81", "accuracy = 0.95"))
    registry = write_registry(tmp_path / "reg", [config(
        "tested", pipelines=[pytest_pipeline("model-tests", suite)])])
    history_job = build_definitions(registry).resolve_job_def(HISTORY_JOB)

    run_partition(instance, registry, "tested|e1")
    suite.write_text(source)  # accuracy 0.81: test_accuracy_reaches_the_bar breaks
    run_partition(instance, registry, "tested|e1")
    result = history_job.execute_in_process(instance=instance, run_config=QUIET)

    table = result.output_for_node("test_history")
    assert len(table) == 16 and table["storage_id"].nunique() == 2
    latest = table[table["storage_id"] == table["storage_id"].max()]
    assert sorted(latest["status"].astype(str)) == [
        "error", "fail", "pass", "pass", "pass", "pass", "skip", "skip"]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["no_flaky_tests"].passed
    regressed = checks["no_test_regressions"]
    # The error has failed since its first run: nothing to range. The broken one regressed.
    [test] = regressed.metadata["tests"].value
    assert test["test"].endswith(" :: test_accuracy_reaches_the_bar")
    assert test["last_pass"]["run_id"] != test["first_failure"]["run_id"]
    # The grid's partition row expands into its tests, the broken one first after the error.
    [grid] = result.asset_materializations_for_node("grid_report")
    page = Path(grid.metadata["path"].value).read_text()
    rows = [line for line in page.splitlines() if line.startswith('<tr class="test p0"')]
    assert "8 tests, 2 failing" in page and len(rows) == 8
    assert "test_accuracy_reaches_the_bar" in rows[0] + rows[1]
    assert "fail: AssertionError: accuracy 0.81 below 0.9" in page
    assert "test_backend_name_round_trips[a/b &lt;c&gt;]" in page  # a name is data
    again = history_job.execute_in_process(instance=instance, run_config=QUIET)
    assert len(again.output_for_node("test_history")) == 16  # nothing appended twice
    # What a person asks at the terminal: which tests fail, since when.
    shown = mlci("--registry", str(registry), "tests", "--status", "failing")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["PARTITION", "TEST", "STATE", "HISTORY", "MESSAGE"]
    broken = next(line for line in lines if "test_accuracy_reaches_the_bar" in line)
    assert "failing 1 run since" in broken and "AssertionError: accuracy 0.81" in broken
    assert len(lines) == 3  # and the error that never passed; nothing else is failing
    assert mlci("--registry", str(registry), "tests", "--status", "flaky").stdout == \
        "no flaky tests\n"
    as_json = json.loads(mlci("--registry", str(registry), "tests", "--json").stdout)
    assert len(as_json) == 8 and {t["partition"] for t in as_json} == {"tested|e1"}
    # The failures grouped by signature name their failing tests.
    report = mlci("--registry", str(registry), "report").stdout
    assert "    tests: 2 of 8 tests failing: pytest :: suite.test_model :: " in report
    # The latest batch as JUnit, read by a reader of its own (junitparser), as CI would.
    out = tmp_path / "mlci.xml"
    written = mlci("--registry", str(registry), "report", "--junit", str(out))
    assert written.returncode == 0, written.stderr
    [suite] = list(JUnitXml.fromfile(str(out)))
    assert suite.name == "tested|e1"
    verdicts = {(case.classname, case.name): [type(r).__name__ for r in case.result]
                for case in suite}
    assert verdicts[("lifecycle", "pipeline_runs")] == ["Failure"]
    assert verdicts[("lifecycle", "ui_smoke")] == ["Skipped"]
    assert verdicts[("model-tests.suite.test_model", "test_accuracy_reaches_the_bar")] == [
        "Failure"]
    assert verdicts[("model-tests.suite.test_model", "test_experiment_is_listed")] == ["Error"]
    assert sum(1 for case in suite if case.classname != "lifecycle") == 8


def test_a_report_of_100000_cases_is_read_whole_and_summed_up_bounded(tmp_path):
    cases = "".join(f'<testcase classname="m" name="t{i}">'
                    + ('<failure message="boom"/>' if i % 100 == 0 else "") + "</testcase>"
                    for i in range(100_000))
    report = read_report(write(tmp_path, f'<testsuite name="s">{cases}</testsuite>'))
    tests = PipelineTests()

    tests.add("suite", report.cases)

    assert report.problem is None and len(report.cases) == 100_000
    assert (tests.counts.passed, tests.counts.failed) == (99_000, 1_000)
    assert tests.failing_total == 1_000 and len(tests.failing) == MAX_FAILING_TESTS
