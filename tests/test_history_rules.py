"""The history rules, specified by tables of cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlci_dagster.history.analysis import (
    alert_open,
    analyze,
    coverage,
    flakiness,
    regression_range,
    signature_clusters,
    slowdown,
)
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.history.render import failure_notes, regression_text, report_table
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.registry.models import HistorySettings
from tests.support.runs import result_record as record

SETTINGS = HistorySettings(alert_open_after=2, alert_close_after=2, flaky_window=10,
                           slowdown_baseline_runs=10, slowdown_min_samples=5,
                           slowdown_confirm_runs=2, slowdown_mad_k=3, slowdown_min_relative=0.2)
NOW = 1_800_000_000.0
DAY = 86_400


def run(status: str = "pass", digest: str = "d1", config_id: str = "c1", code: str = "v1",
        **extra) -> dict:
    return {"run_id": extra.pop("run_id", f"r-{status}-{digest}"), "status": status,
            "failed_stage": None if status == "pass" else status.removeprefix("fail-"),
            "image_digest": digest, "config_id": config_id, "code_version": code,
            "finished_at": extra.pop("finished_at", NOW), "duration_s": 1.0, "trigger": "manual",
            **extra}


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ("", False),
        ("F", False),  # one failure is not enough
        ("FF", True),  # N = 2 consecutive failures open it
        ("FPF", False),  # not consecutive
        ("FFP", True),  # one pass does not close it
        ("FFPP", False),  # M = 2 passes close it
        ("FFPFP", True),  # a failure resets the count of passes
        ("FFPPFF", True),  # and it can open again
    ],
)
def test_alert_opens_after_n_failures_and_closes_after_m_passes(history, expected):
    assert alert_open([c == "P" for c in history], open_after=2, close_after=2) is expected


@pytest.mark.parametrize(
    ("runs", "changed", "verdict"),
    [
        ([run("pass", "d1"), run("fail-pipeline_runs", "d2")], ["product"], "the product changed"),
        ([run("pass", config_id="c1"), run("fail-ui_smoke", config_id="c2")], ["test"],
         "the test changed"),
        ([run("pass", code="v1"), run("fail-sandbox", code="v2")], ["harness"],
         "the harness changed"),
        ([run("pass"), run("fail-sandbox")], [], "nothing changed: likely a flake or an outside "
                                                 "cause"),
        ([run("pass", "d1", "c1"), run("fail-image", "d2", "c2")], ["product", "test"],
         "product and test changed"),
        ([run("fail-image")], [], "no passing run on record"),
    ],
)
def test_regression_range_says_what_changed(runs, changed, verdict):
    found = regression_range(runs)
    assert found["changed"] == changed and found["verdict"] == verdict
    assert found["first_fail"]["image_digest"] == runs[-1]["image_digest"]


def test_regression_range_spans_the_whole_failing_streak():
    runs = [run("pass", "d1", run_id="a"), run("pass", "d2", run_id="b"),
            run("fail-pipeline_runs", "d3", run_id="c"), run("fail-pipeline_runs", "d4",
                                                             run_id="d")]
    found = regression_range(runs)
    assert (found["last_pass"]["run_id"], found["first_fail"]["run_id"]) == ("b", "c")
    assert regression_range(runs[:2]) is None  # passing now: no regression


@pytest.mark.parametrize(
    ("runs", "flaky", "rate"),
    [
        ([run("pass"), run("fail-pipeline_runs"), run("pass")], True, 1.0),  # same digest
        ([run("pass", "d1"), run("fail-pipeline_runs", "d2")], False, 1.0),  # a new build broke
        ([run("pass", config_id="c1"), run("fail-ui_smoke", config_id="c2")], False, 1.0),
        ([run("pass")] * 4, False, 0.0),
        ([run("fail-sandbox")] * 3, False, 0.0),
    ],
)
def test_flaky_means_the_same_build_both_passed_and_failed(runs, flaky, rate):
    found = flakiness(runs, window=10)
    assert (found.flaky, found.transition_rate) == (flaky, rate)


def test_flakiness_only_looks_at_the_window():
    runs = [run("pass"), run("fail-pipeline_runs")] + [run("pass")] * 10
    assert not flakiness(runs, window=10).flaky


@pytest.mark.parametrize(
    ("values", "series", "expected"),
    [
        ([10.0] * 8 + [20.0, 21.0], "duration:pipeline:train", 1.0),  # twice as slow, confirmed
        ([10.0] * 8 + [20.0, 10.0], "duration:pipeline:train", None),  # not confirmed
        ([10.0] * 8 + [11.0, 11.5], "duration:pipeline:train", None),  # below min relative
        ([10.0] * 3 + [30.0, 30.0], "duration:pipeline:train", None),  # too few samples
        ([0.9] * 8 + [0.6, 0.6], "metric:accuracy:higher", 0.333),  # worse the other way
        ([0.9] * 8 + [0.99, 0.99], "metric:accuracy:higher", None),  # better is not slower
        ([0.2] * 8 + [0.3, 0.3], "metric:rmse:lower", 0.5),
    ],
)
def test_slowdown_needs_samples_confirmation_and_magnitude(values, series, expected):
    found = slowdown(series, np.array(values), SETTINGS)
    assert (found.magnitude if found else None) == expected


def test_slowdown_tolerates_noise_within_the_mad():
    noisy = np.array([10, 12, 9, 11, 13, 10, 12, 9, 13.5, 13.8], dtype=float)
    assert slowdown("duration:stage:sandbox", noisy, SETTINGS) is None


def table_of(records: list[ResultRecord]) -> pd.DataFrame:
    return append_rows(None, [record_to_row(r, i + 1) for i, r in enumerate(records)])


def statuses(records: list[ResultRecord], partitions: list[str], now: float = NOW
             ) -> dict[str, str]:
    return {s.partition: str(s.status) for s in analyze(table_of(records), partitions, SETTINGS,
                                                        now)}


def test_statuses_per_partition():
    night = NOW - DAY / 2
    records = [
        record("ok|e1", "pass", night),
        record("failing|e1", "fail-pipeline_runs", night - DAY),
        record("failing|e1", "fail-pipeline_runs", night),
        record("flaky|e1", "pass", night - DAY),
        record("flaky|e1", "fail-ui_smoke", night),  # same digest d1
        record("new-break|e1", "pass", night - DAY),
        record("new-break|e1", "fail-sandbox", night, digest="d2"),  # one failure, new build
        record("infra|e1", "fail-sandbox", night, kind="infra"),
        record("old|e1", "pass", NOW - 3 * DAY),
    ]
    found = statuses(records, ["ok|e1", "never|e1", "old|e1"])
    assert found == {"ok|e1": "PASS", "never|e1": "PENDING", "old|e1": "STALE",
                     "failing|e1": "FAILING", "flaky|e1": "FLAKY", "new-break|e1": "FAILING",
                     "infra|e1": "BROKEN"}


def test_an_outage_night_failing_every_partition_is_not_flakiness():
    partitions = [f"p{i}|e1" for i in range(6)]
    records = []
    for day in range(5):
        at = NOW - (5 - day) * DAY + 3600
        outage = day == 2
        records += [record(p, "fail-sandbox" if outage else "pass", at) for p in partitions]
    summaries = analyze(table_of(records), partitions, SETTINGS, NOW)

    assert {str(s.status) for s in summaries} == {"PASS"}
    assert not any(s.flakiness.flaky for s in summaries)


def night_of(partitions: int, failing: int, kind: str = "product", *, digest: str = "d2"
             ) -> list[ResultRecord]:
    """A passing night on build d1, then a night on `digest` where `failing` of the
    `partitions` fail (for `kind`) and the rest pass."""
    keys = [f"p{i}|e1" for i in range(partitions)]
    records = [record(k, "pass", NOW - 2 * DAY) for k in keys]
    records += [record(k, "fail-pipeline_runs" if i < failing else "pass", NOW - DAY / 2,
                       digest=digest, kind=kind if i < failing else None)
                for i, k in enumerate(keys)]
    return records


@pytest.mark.parametrize(
    ("partitions", "failing", "kind", "settings", "outage"),
    [
        (2, 2, "product", {}, False),  # too small a batch to call it an outage
        (4, 4, "product", {}, False),  # still below the default 5 partitions
        (5, 5, "product", {}, True),
        (6, 6, "product", {}, True),  # the whole matrix failed
        (6, 5, "product", {}, False),  # one partition passed: the matrix was up
        (6, 5, "product", {"outage_min_fraction": 0.8}, True),
        (6, 4, "product", {"outage_min_fraction": 0.8}, False),
        (2, 2, "product", {"outage_min_partitions": 2}, True),
        (2, 1, "infra", {}, True),  # an infrastructure failure is an outage on its own
        (1, 1, "infra", {}, True),
    ],
)
def test_an_outage_needs_an_infra_failure_or_a_large_enough_failing_batch(
    partitions, failing, kind, settings, outage
):
    [latest] = [s for s in analyze(table_of(night_of(partitions, failing, kind)), [],
                                   SETTINGS.model_copy(update=settings), NOW)
                if s.partition == "p0|e1"]

    if outage:
        assert (str(latest.status), latest.regression) == ("BROKEN", None)
    else:
        assert str(latest.status) == "FAILING"
        assert latest.regression["verdict"] == "the product changed"


def test_two_partitions_failing_for_the_product_are_a_regression_not_an_outage():
    records = night_of(2, 2) + [record(f"p{i}|e1", "fail-pipeline_runs", NOW - 3600,
                                       digest="d2") for i in range(2)]

    summaries = analyze(table_of(records), ["p0|e1", "p1|e1"], SETTINGS, NOW)

    assert [(str(s.status), s.alert_open) for s in summaries] == [("FAILING", True)] * 2
    assert all(s.regression["changed"] == ["product"] for s in summaries)


def test_outage_thresholds_have_defaults_and_bounds():
    from pydantic import ValidationError

    defaults = HistorySettings()
    assert (defaults.outage_min_partitions, defaults.outage_min_fraction) == (5, 1.0)
    for bad in ({"outage_min_partitions": 1}, {"outage_min_fraction": 0},
                {"outage_min_fraction": 1.5}):
        with pytest.raises(ValidationError):
            HistorySettings(**bad)


def test_a_config_change_is_not_blamed_on_the_product():
    records = [record("c|e1", "pass", NOW - 2 * DAY), record("c|e1", "fail-ui_smoke", NOW - DAY)]
    records[1] = records[1].model_copy(update={"config_id": "c2"})
    [summary] = analyze(table_of(records), ["c|e1"], SETTINGS, NOW)

    assert summary.regression["changed"] == ["test"]
    assert summary.regression["verdict"] == "the test changed"


def test_partitions_are_never_mixed():
    # Same config on two engines, and the same engine on two configs: exact keys only.
    records = [record("a|e1", "pass", NOW - DAY), record("a|e2", "fail-image", NOW - DAY),
               record("b|e1", "fail-image", NOW - DAY), record("a|e1", "pass", NOW - 100)]
    found = statuses(records, [])
    assert found == {"a|e1": "PASS", "a|e2": "FAILING", "b|e1": "FAILING"}


def test_slowdown_is_reported_per_partition_with_its_figures():
    records = [record("s|e1", "pass", NOW - (20 - i) * 3600, duration=10.0) for i in range(8)]
    records += [record("s|e1", "pass", NOW - (2 - i) * 3600, duration=25.0) for i in range(2)]
    [summary] = analyze(table_of(records), ["s|e1"], SETTINGS, NOW)

    slow = {s.series: s for s in summary.slowdowns}
    assert slow["duration:pipeline:train"].magnitude == 1.5
    assert slow["duration:pipeline:train"].baseline_median == 10.0


def test_coverage_counts():
    summaries = analyze(table_of([record("a|e1", "pass", NOW - 60)]), ["a|e1", "b|e1"],
                        SETTINGS, NOW)
    counts = coverage(summaries)
    assert (counts["tested"], counts["untested"], counts["passing"]) == (1, 1, 1)


def test_append_is_append_only():
    first = table_of([record("a|e1", "pass", NOW)])
    again = append_rows(first, [record_to_row(record("a|e1", "pass", NOW), 1)])
    more = append_rows(first, [record_to_row(record("a|e1", "pass", NOW + 1), 2)])
    assert (len(again), len(more)) == (1, 2)


def test_missing_values_come_back_as_none_not_nan():
    records = [record("a|e1", "pass", NOW - 120), record("a|e1", "fail-image", NOW - 60)]
    [summary] = analyze(table_of(records), ["a|e1"], SETTINGS, NOW)
    assert summary.regression["last_pass"]["failed_stage"] is None


def test_summaries_are_plain_json():
    import json

    records = [record("a|e1", "pass", NOW - 120), record("b|e1", "fail-image", NOW - 60)]
    summaries = analyze(table_of(records), ["a|e1", "b|e1"], SETTINGS, NOW)
    assert json.loads(json.dumps([s.to_dict() for s in summaries]))[0]["runs"] == 1


def report_rows(records: list[ResultRecord], partitions: list[str]) -> dict[str, str]:
    text = report_table(analyze(table_of(records), partitions, SETTINGS, NOW), now=NOW)
    return {line.split()[0]: line for line in text.splitlines()[1:]}


def test_report_shows_the_regression_range_of_a_failing_partition_alert_or_not():
    night = NOW - DAY / 2
    records = [
        record("new-break|e1", "pass", night - DAY),
        record("new-break|e1", "fail-sandbox", night, digest="d2"),  # alert not open yet
        record("broken|e1", "pass", night - 2 * DAY),
        record("broken|e1", "fail-sandbox", night - DAY, digest="d2"),
        record("broken|e1", "fail-sandbox", night, digest="d2"),  # alert open
        record("ok|e1", "pass", night),
    ]

    rows = report_rows(records, [])

    assert "d1→d2 (the product changed)" in rows["new-break|e1"]
    assert "alert open" not in rows["new-break|e1"]
    assert "d1→d2 (the product changed), alert open" in rows["broken|e1"]
    assert "→" not in rows["ok|e1"]


def test_report_and_json_agree_on_which_partitions_have_a_regression():
    night = NOW - DAY / 2
    records = [record("a|e1", "pass", night - DAY), record("a|e1", "fail-image", night, "d2"),
               record("b|e1", "pass", night - DAY), record("b|e1", "pass", night),
               record("c|e1", "fail-image", night)]
    summaries = analyze(table_of(records), [], SETTINGS, NOW)

    shown = {s.partition: regression_text(s) != "-" for s in summaries}
    in_json = {d["partition"]: d["regression"] is not None for d in
               (s.to_dict() for s in summaries)}
    assert shown == in_json == {"a|e1": True, "b|e1": False, "c|e1": True}


def test_report_flakiness_is_a_dash_unless_flaky():
    night = NOW - DAY / 2
    records = [record("steady|e1", "pass", night - DAY), record("steady|e1", "pass", night),
               record("broke|e1", "pass", night - DAY),
               record("broke|e1", "fail-image", night, digest="d2"),
               record("flaky|e1", "pass", night - DAY), record("flaky|e1", "fail-ui_smoke", night)]

    rows = report_rows(records, [])

    assert rows["steady|e1"].endswith("  -")
    assert rows["broke|e1"].endswith("  -")  # flipped once, but a new build: not flaky
    assert rows["flaky|e1"].endswith("flaky (100% flips)")
    assert "flips" not in rows["steady|e1"] + rows["broke|e1"]


def test_an_image_recorded_as_a_tag_reference_is_shown_by_its_name_not_its_tag():
    """A tag no declared registry resolves is recorded as written (`registry.test/app:1`):
    the report names it `app:1`, where a digest shows its first 12 hex characters."""
    night = NOW - DAY / 2
    digest = "sha256:" + "4f2a1b3c9d8e" + "0" * 52
    records = [
        record("tagged|e1", "pass", night - DAY, digest="registry.test/app:1"),
        record("tagged|e1", "fail-sandbox", night - 3600, digest="registry.test/app:2"),
        record("pinned|e1", "pass", night - DAY, digest="registry.test/app@" + digest),
        record("pinned|e1", "fail-sandbox", night, digest=digest.replace("4f2a", "5e3b")),
    ]
    records = [r.model_copy(update={"error_summary": "ValueError: broke"}) for r in records]
    table = table_of(records)
    summaries = analyze(table, [], SETTINGS, NOW)

    rows = report_rows(records, [])
    notes = failure_notes(summaries, {r.partition: r for r in records[1::2]},
                          signature_clusters(table, summaries))

    assert "app:1→app:2 (the product changed)" in rows["tagged|e1"]
    assert "4f2a1b3c9d8e→5e3b1b3c9d8e (the product changed)" in rows["pinned|e1"]
    assert "image app:2, 2 runs in all" in notes  # the signature's first failure
    assert "image 2," not in notes and " 1→2 " not in rows["tagged|e1"]


def committed_registry(root, message: str):
    """A registry inside a git repository of its own (a product's), at a commit of its own."""
    import subprocess

    from tests.support.registries import config, write_registry

    write_registry(root, [config("a")])
    (root / "product.txt").write_text(message)
    for argv in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-qm",
                  message]):
        subprocess.run(["git", *argv], cwd=root, check=True, capture_output=True)
    return root


def test_a_commit_to_the_registry_s_repository_is_no_harness_change(tmp_path):
    """The registry lives in the product's repository: a commit there between the last pass
    and the first failure changed the product (a new image), not the harness that tested it."""
    from mlci_dagster.registry import load_registry
    from mlci_dagster.stages.context import LifecycleContext
    from mlci_dagster.stages.details import ImageDetails
    from mlci_dagster.stages.outcome import StageClock
    from mlci_dagster.stages.results import build_record
    from mlci_dagster.vocabulary import FailureKind, Stage

    records = []
    for name, digest, fails in (("before", "sha256:aaaa", False), ("after", "sha256:bbbb", True)):
        root = committed_registry(tmp_path / name, name)
        ctx = LifecycleContext.create(load_registry(root), "a", "e1", f"run-{name}",
                                      tmp_path / "home")
        outcomes = [StageClock(Stage.IMAGE).passed(ImageDetails(digest=digest))]
        if fails:
            outcomes.append(StageClock(Stage.SANDBOX).failed(FailureKind.PRODUCT, "it broke"))
        records.append(build_record(ctx, outcomes))

    rows = report_rows(records, [])

    assert records[0].code_version == records[1].code_version
    assert "aaaa→bbbb (the product changed)" in rows["a|e1"]
    assert "harness" not in rows["a|e1"]


def test_the_harness_version_changes_exactly_when_its_own_source_does(tmp_path):
    import shutil

    from mlci_dagster import __version__
    from mlci_dagster.stages.context import PACKAGE_DIR, code_version

    same, changed = tmp_path / "same" / "mlci_dagster", tmp_path / "changed" / "mlci_dagster"
    for copy in (same, changed):
        shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (same / "notes.txt").write_text("not source")  # only the Python source counts
    results = changed / "stages" / "results.py"
    results.write_text(results.read_text() + "\n# a change to the harness\n")

    assert code_version(same) == code_version() == code_version(PACKAGE_DIR)
    assert code_version(changed) != code_version(same)
    assert code_version(changed).startswith(f"{__version__}+")
