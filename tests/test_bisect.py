"""Bisection as LUCI's nth-section does it: the next runs split what is left as evenly as the
free slots allow, nothing runs twice, the culprit is verified with its parent, and it stops,
saying why, on a flake, an outage, another signature or the run limit."""

from __future__ import annotations

import pytest

from mlci_dagster.culprits.bisect import (
    Bisection,
    Rerun,
    RerunKind,
    RerunStatus,
    State,
    dividers,
)

COMMITS = [f"c{i}" for i in range(1, 16)]  # after the last pass c0; c15 failed first


def settle(bisection: Bisection, runs: list[Rerun], breaks_at: int) -> None:
    """Runs finish: a commit fails from `breaks_at` (its number) on."""
    for run in runs:
        failed = int(run.commit[1:]) >= breaks_at
        bisection.reruns.append(Rerun(run.commit, RerunStatus.FAILED if failed
                                      else RerunStatus.PASSED, run.kind))


def bisect(breaks_at: int, slots: int) -> tuple[Bisection, int]:
    bisection, rounds = Bisection("c0", list(COMMITS), max_runs=20), 0
    while (runs := bisection.next_runs(slots)):
        rounds += 1
        settle(bisection, runs, breaks_at)
    return bisection, rounds


@pytest.mark.parametrize("breaks_at", range(1, 16))
def test_the_culprit_is_found_and_confirmed_wherever_it_is(breaks_at):
    bisection, _ = bisect(breaks_at, slots=1)

    verdict = bisection.verdict()
    assert (verdict.state, verdict.culprit) == (State.CONFIRMED, f"c{breaks_at}")
    assert len(bisection.reruns) <= 6  # 4 to bisect 15 commits, 2 to verify
    assert len({(r.commit, r.kind) for r in bisection.reruns}) == len(bisection.reruns)


def test_more_slots_take_fewer_rounds():
    one, rounds_one = bisect(11, slots=1)
    three, rounds_three = bisect(11, slots=3)

    assert one.verdict().culprit == three.verdict().culprit == "c11"
    assert rounds_three < rounds_one


def test_runs_in_progress_split_the_range_and_are_not_started_again():
    bisection = Bisection("c0", list(COMMITS), [Rerun("c8", RerunStatus.IN_PROGRESS)])

    runs = bisection.next_runs(2)

    assert [r.commit for r in runs] == ["c4", "c12"]


def test_a_pass_newer_than_a_failure_stops_with_no_culprit():
    bisection = Bisection("c0", list(COMMITS), [Rerun("c5", RerunStatus.FAILED),
                                                 Rerun("c9", RerunStatus.PASSED)])

    verdict = bisection.verdict()

    assert verdict.state is State.STOPPED and "c9 passed after an older commit failed" in \
        verdict.why
    assert bisection.next_runs(3) == []


@pytest.mark.parametrize(("status", "why"), [
    (RerunStatus.OTHER_SIGNATURE, "c8 failed with another signature"),
    (RerunStatus.TEST_SKIPPED, "the failing test was skipped at c8"),
])
def test_a_midpoint_that_says_nothing_of_the_regression_stops_it(status, why):
    bisection = Bisection("c0", list(COMMITS), [Rerun("c8", status)])

    assert (bisection.verdict().state, bisection.verdict().why) == (State.STOPPED, why)
    assert bisection.next_runs(1) == []


def test_more_than_two_infra_failures_stop_it():
    reruns = [Rerun(c, RerunStatus.INFRA_FAILED) for c in ("c8", "c4", "c12")]

    assert Bisection("c0", list(COMMITS), reruns[:2]).verdict().state is State.RUNNING
    stopped = Bisection("c0", list(COMMITS), reruns).verdict()
    assert (stopped.state, stopped.why) == (State.STOPPED, "3 reruns failed for infrastructure")


def test_no_run_beyond_the_maximum():
    bisection = Bisection("c0", list(COMMITS), max_runs=2)
    settle(bisection, bisection.next_runs(5), breaks_at=11)

    assert len(bisection.reruns) == 2
    assert bisection.next_runs(5) == [] and bisection.runs_left == 0
    assert bisection.verdict().state is State.RUNNING  # not found, and says where it may be


def test_a_culprit_its_parent_does_not_confirm_is_no_culprit():
    bisection = Bisection("c0", ["c1"], [Rerun("c1", RerunStatus.FAILED, RerunKind.VERIFICATION),
                                         Rerun("c0", RerunStatus.FAILED, RerunKind.VERIFICATION)])

    verdict = bisection.verdict()

    assert verdict.state is State.STOPPED and verdict.why.startswith("not confirmed: c1 failed")


@pytest.mark.parametrize(("length", "taken", "count", "expected"), [
    (16, set(), 1, [7]), (16, set(), 3, [3, 7, 11]), (2, set(), 5, [0]), (1, set(), 3, []),
    (16, {7}, 1, [3]),
])
def test_dividers_leave_the_largest_part_as_small_as_they_can(length, taken, count, expected):
    assert dividers(length, taken, count) == expected


def test_a_range_with_a_commit_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        Bisection("c0", ["c1", "c1"])
