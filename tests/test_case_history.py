"""The per-test history: rows appended as results land, analysed per (partition, test)."""

from __future__ import annotations

from mlci_dagster.history.case_analysis import TestState, analyze_cases
from mlci_dagster.history.cases import append_cases, case_rows
from mlci_dagster.junit.read import TestCase, TestStatus
from mlci_dagster.registry.models import HistorySettings
from tests.support.runs import result_record

P, F, E, S = TestStatus.PASS, TestStatus.FAIL, TestStatus.ERROR, TestStatus.SKIP
# Six runs of partition a|e1, the image changing at the fourth: each test's status per run
# (None: not in that run) and its duration.
PLAN = {
    "test_stable": [P, P, P, P, P, P],
    "test_regress": [P, P, P, F, F, E],
    "test_flaky": [P, F, P, F, P, P],
    "test_new": [None, None, None, None, None, P],
    "test_gone": [P, P, P, P, P, None],
    "test_slow": [P, P, P, P, P, P],
    "test_skip": [P, P, P, P, P, S],
}


def cases_of(run: int, plan: dict) -> list[TestCase]:
    return [TestCase("pytest", "m", name, statuses[run], 3.0 if name == "test_slow" and run == 5
                     else 1.0 + 0.01 * run, message=f"{name} broke in run {run}"
                     if statuses[run] in (F, E) else "", signature=f"sig-{name}"
                     if statuses[run] in (F, E) else "")
            for name, statuses in plan.items() if statuses[run] is not None]


def history(plans: dict[str, dict], runs: int = 6):
    table, storage = None, 0
    for run in range(runs):
        frames = []
        for partition, plan in plans.items():
            storage += 1
            record = result_record(partition, "pass", 1000.0 + run,
                                   digest="d1" if run < 3 else "d2").model_copy(
                update={"batch": f"nightly {run}", "run_id": f"{partition}-{run}"})
            frames.append(case_rows(record, storage, "tests", cases_of(run, plan)))
        table = append_cases(table, frames)
    return table


def test_each_test_of_a_partition_has_its_state_range_flakiness_and_speed():
    table = history({"a|e1": PLAN, "b|e1": {"test_regress": [P] * 6}})

    found = {(t.partition, t.test_id.rsplit(" :: ", 1)[-1]): t
             for t in analyze_cases(table, HistorySettings())}

    regress = found[("a|e1", "test_regress")]
    assert (regress.state, regress.failing_streak, regress.regression) == (
        TestState.FAILING, 3, True)
    assert regress.last_pass["run_id"] == "a|e1-2" and regress.last_pass["image_digest"] == "d1"
    assert regress.first_failure["run_id"] == "a|e1-3"
    assert regress.first_failure["image_digest"] == "d2"
    assert regress.first_failure["batch"] == "nightly 3"
    assert regress.message == "test_regress broke in run 5" and regress.status == "error"
    assert found[("b|e1", "test_regress")].state is TestState.PASSING  # never mixed
    flaky = found[("a|e1", "test_flaky")]
    assert (flaky.state, flaky.flips, flaky.regression) == (TestState.FLAKY, 4, False)
    assert found[("a|e1", "test_new")].new and found[("a|e1", "test_new")].runs == 1
    assert not found[("a|e1", "test_stable")].new
    assert found[("a|e1", "test_gone")].state is TestState.VANISHED
    assert found[("a|e1", "test_skip")].state is TestState.SKIPPED
    slow = found[("a|e1", "test_slow")]
    assert slow.baseline_s == 1.02 and slow.slower_by == round((3.0 - 1.02) / 1.02, 3)
    assert found[("a|e1", "test_stable")].slower_by == 0.0
    # Failing first, then flaky.
    ordered = [t.state for t in analyze_cases(table, HistorySettings())]
    assert ordered[:2] == [TestState.FAILING, TestState.FLAKY]


def test_a_test_failing_since_it_first_ran_has_no_range_to_open():
    table = history({"a|e1": {"test_never": [F, F, F]}}, runs=3)

    [never] = analyze_cases(table, HistorySettings())

    assert (never.state, never.failing_streak, never.last_pass, never.regression) == (
        TestState.FAILING, 3, None, False)
    assert never.first_failure["run_id"] == "a|e1-0"


def test_a_producer_rerun_makes_a_passing_test_flaky():
    table = history({"a|e1": {"test_x": [P, P]}}, runs=2)
    table["flaky"] = [False, True]

    [flaky] = analyze_cases(table, HistorySettings())

    assert flaky.state is TestState.FLAKY


def test_rows_already_in_the_table_are_not_appended_again():
    table = history({"a|e1": {"test_x": [P, P]}}, runs=2)
    again = append_cases(table, [table[table["storage_id"] == 2]])

    assert len(again) == len(table) == 2
    assert str(again["test_id"].dtype) == "category"
