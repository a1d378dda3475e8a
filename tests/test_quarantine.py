"""Quarantine rules, pure: which failures an entry covers (a partition's, or one whose every
failing test is quarantined), how a commit summary counts and words them, and the file's
problems named by file and field."""

from __future__ import annotations

import datetime as dt

import pytest

from mlci_dagster.registry import RegistryError
from mlci_dagster.registry.quarantine import Quarantine, QuarantineEntry, load_quarantine
from mlci_dagster.tiers.commit_summary import PartitionRun, summarize

NOW = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC).timestamp()


def entry(partition: str, test: str | None = None, expires: str = "2026-12-20"
          ) -> QuarantineEntry:
    return QuarantineEntry(partition=partition, test=test, owner="ml-team", reason="flaky",
                           expires=expires)


def failed(partition: str, tests: tuple[str, ...] = ()) -> PartitionRun:
    return PartitionRun(partition, f"run-{partition}", "FAILURE", "pipeline_runs",
                        failing_tests=tests)


def test_an_entry_covers_its_partition_or_failures_whose_every_test_it_names():
    quarantine = Quarantine(quarantine=[entry("a|e1"), entry("b|e1", "t :: one"),
                                        entry("b|e1", "t :: two")])
    assert [e.target for e in quarantine.covering("a|e1", ["anything"])] == ["a|e1"]
    assert [e.target for e in quarantine.covering("b|e1", ["t :: one", "t :: two"])] == [
        "b|e1 :: t :: one", "b|e1 :: t :: two"]
    assert quarantine.covering("b|e1", ["t :: one", "t :: three"]) == []  # one not covered
    assert quarantine.covering("b|e1", []) == []  # failed with no test named
    assert quarantine.covering("c|e1", ["t :: one"]) == []


def test_the_summary_counts_quarantined_failures_as_passes_and_names_them():
    quarantine = Quarantine(quarantine=[entry("b|e1", "t :: one"),
                                        entry("c|e1", expires="2026-12-07")])
    runs = [PartitionRun("a|e1", "run-a", "SUCCESS"), failed("b|e1", ("t :: one",))]
    summary = summarize("s" * 40, "merge", 2, runs, "http://d", quarantine, NOW)
    assert summary.state == "success"
    assert summary.description == "1 of 2 partitions passed, 1 quarantined: b|e1"
    assert "quarantined: b|e1 :: t :: one (until 2026-12-20, ml-team: flaky)" in \
        summary.markdown()
    # The day it expires, it counts again, and says so.
    summary = summarize("s" * 40, "merge", 2, [runs[0], failed("c|e1")], "http://d",
                        quarantine, NOW)
    assert summary.state == "failure"
    assert summary.description.endswith("failing: c|e1 (pipeline_runs; quarantine expired "
                                        "2026-12-07)")


def test_the_quarantine_file_s_problems_name_the_file_and_field(tmp_path):
    path = tmp_path / "quarantine.yaml"
    assert load_quarantine(tmp_path) == Quarantine()  # no file: nothing quarantined
    path.write_text("quarantine:\n- partition: A|e1\n  owner: x\n  reason: ''\n"
                    "  expires: soon\n  colour: red\n")
    with pytest.raises(RegistryError) as raised:
        load_quarantine(tmp_path)
    problems = raised.value.problems
    assert [p.split(": ")[1] for p in problems] == [
        "quarantine[0].partition", "quarantine[0].reason", "quarantine[0].expires",
        "quarantine[0].colour"]
    assert all(p.startswith(f"{path}: ") for p in problems)
    path.write_text("- just a list\n")
    with pytest.raises(RegistryError, match="expected a mapping"):
        load_quarantine(tmp_path)


def test_a_flaky_test_past_the_threshold_is_proposed_once_and_never_when_quarantined(instance):
    """The notifier's proposal from a no_flaky_tests evaluation (as the test_history asset
    stores it): the test's quarantine proposed with the command that makes it, once while it
    stays flaky; none for a test below the threshold or quarantined already."""
    import dagster as dg

    from mlci_dagster.notify.notifier import NotifierState
    from mlci_dagster.registry.models import QuarantineSettings
    from mlci_dagster.sensors.notify import FLAKY_TESTS_CHECK, collect

    def evaluate(*tests: dict) -> None:
        instance.report_runless_asset_event(dg.AssetCheckEvaluation(
            asset_key=FLAKY_TESTS_CHECK.asset_key, check_name=FLAKY_TESTS_CHECK.name,
            passed=False, metadata={"tests": dg.MetadataValue.json(list(tests))}))

    flaky = {"partition": "a|e1", "test": "suite :: test_io", "flips": 4, "runs": 10,
             "signature": "0123456789ab", "transition_rate": 0.444}
    calm = {**flaky, "test": "suite :: test_calm", "flips": 2, "transition_rate": 0.222}
    evaluate(flaky, calm)
    settings, state = QuarantineSettings(), NotifierState()
    (proposal,) = collect(instance, state, "", quarantine=settings)
    assert proposal.kind == "quarantine" and proposal.signature == "0123456789ab"
    assert proposal.title.startswith("quarantine proposed: a|e1 :: suite :: test_io is flaky "
                                     "(44% flips in its last 10 runs")
    assert proposal.facts["to quarantine it"].startswith(
        "mlci quarantine add 'a|e1' --test 'suite :: test_io' --owner <owner>")
    evaluate(flaky, calm)
    assert collect(instance, state, "", quarantine=settings) == []  # proposed once
    evaluate(calm)  # no longer flaky past the threshold, then again: proposed again
    evaluate(flaky)
    assert [p.title[:60] for p in collect(instance, state, "", quarantine=settings)] == [
        proposal.title[:60]]
    evaluate(flaky)
    assert collect(instance, NotifierState(), "", quarantine=settings,
                   quarantined={"a|e1 :: suite :: test_io"}) == []
