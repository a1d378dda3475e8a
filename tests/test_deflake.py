"""Deflake reruns on a real Dagster instance: a partition whose pipeline fails one time in three
(a seeded draw per run) is rerun on the same image when its policy allows, each rerun a Dagster
run tagged with the run it reruns; a failure that passes on rerun is recorded flaky and opens
no regression, no issue and no culprit search, where with reruns off it is a regression as
before. A failure that fails every attempt is confirmed, and only then announced."""

from __future__ import annotations

import random
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlci_dagster.cli import main
from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.event_log import new_results, partition_results
from mlci_dagster.history.analysis import analyze
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.notify.message import signature_of_record
from mlci_dagster.notify.notifier import NotifierState
from mlci_dagster.paths import mlci_home
from mlci_dagster.registry.models import HistorySettings, QuarantineSettings
from mlci_dagster.searches import starts_regression
from mlci_dagster.sensors.commits import run_set_runs
from mlci_dagster.sensors.notify import collect
from mlci_dagster.tiers.commit_summary import summarize
from tests.support.daemon import RUN_KEY_TAG, launch
from tests.support.registries import command_pipeline, config, write_registry
from tests.support.runs import QUIET, assert_no_leaks, result_record, stage_details

KEY = "model|e1"
DRAW = ("import os, pathlib, random; p = pathlib.Path(os.environ['COUNTER']); "
        "n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); "
        "fails = random.Random(f\"{os.environ['SEED']}:{n}\").random() < 1 / 3; "
        "print('draw', n, 'fails' if fails else 'passes'); raise SystemExit(1 if fails else 0)")


def fails(seed: int, draw: int) -> bool:
    """What the pipeline's draw `draw` does under `seed` (one time in three it fails)."""
    return random.Random(f"{seed}:{draw}").random() < 1 / 3


# The first seed whose first draw fails and whose second passes: a failure a rerun clears.
SEED = next(s for s in range(1000) if fails(s, 0) and not fails(s, 1))


def registry(root: Path, reruns: int | None, code: str = DRAW) -> Path:
    extra = {} if reruns is None else {"reruns": reruns}
    body = config("model", tiers=["nightly"], **extra, pipelines=[command_pipeline(
        "train", code, env={"COUNTER": str(root / "counter"), "SEED": str(SEED)})])
    path = write_registry(root / "reg", [body])
    settings = yaml.safe_load((path / "mlci.yaml").read_text())
    settings["tiers"] = {"nightly": {"trigger": "nightly", "reruns": 1}}
    (path / "mlci.yaml").write_text(yaml.safe_dump(settings))
    return path


def first_signature(record) -> str:
    return signature_of_record(record).id


def summary_of(instance: dg.DagsterInstance):
    table = append_rows(None, [record_to_row(r, i) for i, r in new_results(instance, 0)])
    (summary,) = analyze(table, [KEY], HistorySettings(), now=time.time())
    return summary


def test_a_one_in_three_failure_passes_on_rerun_and_is_recorded_flaky(
        instance, dagster_home, tmp_path, capsys):
    assert SEED is not None and sum(fails(SEED, n) for n in range(300)) in range(70, 130)
    path = registry(tmp_path, reruns=2)
    assert main(["--registry", str(path), "run"]) == 0  # a flake is no failure
    out = capsys.readouterr().out
    assert f"{KEY}: FAILED, rerun" in out and "attempt 2 next" in out
    assert f"{KEY}: FLAKY" in out and "passed on attempt 2, after failing" in out

    records = [r for _, r in new_results(instance, 0)]
    first, second = records
    assert (first.passed, first.rerun_due, first.attempt) == (False, True, 1)
    assert (second.passed, second.rerun_due, second.attempt) == (True, False, 2)
    assert second.rerun_of == first.run_id and second.batch == first.batch
    assert second.image_digest == first.image_digest  # the same image
    # The rerun is a Dagster run saying what it reruns, in the first attempt's batch.
    rerun = instance.get_run_by_id(second.run_id)
    assert rerun.tags["mlci/rerun_of"] == first.run_id and rerun.tags["mlci/attempt"] == "2"
    assert rerun.tags["mlci/batch"] == instance.get_run_by_id(first.run_id).tags["mlci/batch"]

    summary = summary_of(instance)
    assert summary.status == "FLAKY" and summary.regression is None
    assert summary.flakiness.flaky_cells == [[first.run_id, second.run_id]]
    # No issue: the notifier announces no signature; no culprit search starts.
    assert collect(instance, NotifierState(), "http://dagster.test") == []
    # Flaky past the threshold (1 flip in 2 runs), its quarantine is proposed: once, never
    # made, and not for a partition quarantined already.
    state = NotifierState()
    (proposal,) = collect(instance, state, "http://dagster.test", quarantine=QuarantineSettings())
    assert proposal.kind == "quarantine" and proposal.partitions == [KEY]
    assert proposal.title == (f"quarantine proposed: {KEY} is flaky (100% flips in its last 2 "
                              "runs, over the 30% threshold)")
    assert proposal.facts["to quarantine it"].startswith(f"mlci quarantine add '{KEY}' ")
    assert proposal.signature == first_signature(first) and state.proposed == [KEY]
    assert collect(instance, state, "http://dagster.test", quarantine=QuarantineSettings()) == []
    assert not (tmp_path / "reg" / "quarantine.yaml").exists()
    assert collect(instance, NotifierState(), "http://dagster.test",
                   quarantine=QuarantineSettings(), quarantined={KEY}) == []
    assert not any(starts_regression(instance, i, r) for i, r in new_results(instance, 0))
    assert [r.run_id for r in partition_results(instance, KEY)] == [second.run_id]
    # Nothing of either attempt's sandbox is left: processes, ports, directories, ledger.
    for record in records:
        assert_no_leaks(dagster_home, stage_details(instance, record.run_id, "sandbox")["handle"])
    # The grid shows both attempts in one cell, the failed one first.
    assert main(["--registry", str(path), "report", "--html", str(tmp_path / "html")]) == 0
    grid = (tmp_path / "html" / "grid.html").read_text()
    assert "linear-gradient(to right, #cf222e 0% 50%, #2da44e 50% 100%)" in grid
    assert f"attempt 1: fail-pipeline_runs, run {first.run_id}" in grid


def test_with_reruns_off_the_same_failure_is_a_regression(instance, dagster_home, tmp_path,
                                                          capsys):
    path = registry(tmp_path, reruns=0)
    assert main(["--registry", str(path), "run"]) == 1
    assert f"{KEY}: FAILED" in capsys.readouterr().out
    (record,) = [r for _, r in new_results(instance, 0)]
    assert not record.rerun_due and instance.get_runs(
        dg.RunsFilter(tags={"mlci/rerun_of": record.run_id})) == []
    summary = summary_of(instance)
    assert summary.status == "FAILING" and summary.regression is not None
    (notification,) = collect(instance, NotifierState(), "http://dagster.test")
    assert notification.kind == "signature" and notification.partitions == [KEY]


def test_mlci_run_confirms_a_failure_that_fails_every_attempt(instance, dagster_home, tmp_path,
                                                               capsys):
    path = registry(tmp_path, reruns=1, code="raise SystemExit(1)")
    assert main(["--registry", str(path), "run"]) == 1
    out = capsys.readouterr().out
    assert f"{KEY}: FAILED, rerun" in out and "failed all 2 attempts" in out
    first, second = [r for _, r in new_results(instance, 0)]
    assert (first.rerun_due, second.rerun_due, second.rerun_of) == (True, False, first.run_id)
    assert summary_of(instance).status == "FAILING"


def run_nightly(instance: dg.DagsterInstance, path: Path, sha: str) -> dg.DagsterRun:
    """The partition's run in a nightly run set at commit `sha`, as the schedule tags it."""
    instance.add_dynamic_partitions("config", ["model"])
    job = build_definitions(path).resolve_job_def(LIFECYCLE_JOB)
    result = job.execute_in_process(
        partition_key=KEY, instance=instance, raise_on_error=False, run_config=QUIET,
        tags={"mlci/trigger": "schedule", "mlci/batch": "nightly 2026-12-07",
              "mlci/tier": "nightly", "mlci/sha": sha, "mlci/runs": "1"})
    return instance.get_run_by_id(result.run_id)


def tick(instance: dg.DagsterInstance, path: Path, cursor: str | None
         ) -> tuple[list[dg.RunRequest], str | None]:
    definitions = build_definitions(path)
    sensor = definitions.resolve_sensor_def("deflake_reruns")
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources=definitions.resources) as context:
        result = sensor(context)
    return list(result.run_requests or []), result.cursor or cursor


@pytest.mark.parametrize("always_fails", [False, True], ids=["flaky", "broken"])
def test_the_sensor_reruns_a_nightly_failure_by_its_tiers_policy(
        instance, dagster_home, tmp_path, always_fails):
    """The tier's `reruns: 1`: one rerun, launched once by the deflake_reruns sensor. Until it
    is recorded the failure is no verdict: the commit status is pending and nothing is
    announced; then it is a flake (success, `1 flaky`) or confirmed (failure, announced)."""
    path = registry(tmp_path, reruns=None, code="raise SystemExit(1)" if always_fails else DRAW)
    sha = "a" * 40
    _, cursor = tick(instance, path, None)  # the first tick starts after what is on record
    first = run_nightly(instance, path, sha)
    assert summary_of(instance).rerunning["run_id"] == first.run_id
    assert summary_of(instance).status == "PENDING"  # no verdict before its rerun
    assert collect(instance, NotifierState(), "http://dagster.test") == []
    pending = summarize(sha, "nightly", *run_set_runs(instance, sha, "nightly"), "http://d")
    assert pending.state == "pending" and pending.description.endswith("1 rerunning")

    requests, cursor = tick(instance, path, cursor)
    (request,) = requests
    assert request.run_key == f"rerun:{first.run_id}:2"
    assert {k: request.tags[k] for k in ("mlci/rerun_of", "mlci/attempt", "mlci/batch",
                                         "mlci/sha", "mlci/tier", "mlci/trigger")} == {
        "mlci/rerun_of": first.run_id, "mlci/attempt": "2", "mlci/batch": "nightly 2026-12-07",
        "mlci/sha": sha, "mlci/tier": "nightly", "mlci/trigger": "schedule"}
    assert tick(instance, path, cursor)[0] == []  # asked once
    launch(instance, path, mlci_home(), "deflake_reruns", requests)
    launch(instance, path, mlci_home(), "deflake_reruns", requests)  # the run key dedupes
    (rerun,) = instance.get_runs(dg.RunsFilter(tags={"mlci/rerun_of": first.run_id}))
    assert rerun.tags[RUN_KEY_TAG] == request.run_key
    assert tick(instance, path, cursor)[0] == []  # attempt 2 is the tier's last

    summary = summary_of(instance)
    final = summarize(sha, "nightly", *run_set_runs(instance, sha, "nightly"), "http://d")
    notified = collect(instance, NotifierState(), "http://dagster.test")
    if always_fails:
        assert summary.status == "FAILING" and summary.regression is not None
        assert final.state == "failure"
        (notification,) = notified
        assert notification.kind == "signature" and notification.run_id == rerun.run_id
    else:
        assert summary.status == "FLAKY" and summary.regression is None
        assert final.state == "success"
        assert final.description == "1 of 1 partitions passed, 1 flaky: model|e1"
        assert notified == []


def attempts_table(*rows: tuple[str, int, bool]):
    """Records of one partition, a minute apart: (status, attempt, rerun due); attempts after
    the first rerun the latest first attempt. The first record tested image d1, the rest d2."""
    records, first = [], None
    for i, (status, attempt, due) in enumerate(rows):
        record = result_record(KEY, status, 1000.0 + 60 * i, digest="d2" if i else "d1")
        if attempt == 1:
            first = record.run_id
        records.append(record.model_copy(update={
            "attempt": attempt, "rerun_due": due, "rerun_of": None if attempt == 1 else first}))
    table = append_rows(None, [record_to_row(r, i + 1) for i, r in enumerate(records)])
    (summary,) = analyze(table, [KEY], HistorySettings(alert_open_after=2), now=2000.0)
    return summary, [r.run_id for r in records]


def test_attempts_are_one_cell_to_the_rules_and_an_awaited_rerun_is_no_verdict_yet():
    # A pass, then a failure whose rerun is due: the partition stands on its pass.
    summary, runs = attempts_table(("pass", 1, False), ("fail-pipeline_runs", 1, True))
    assert (summary.status, summary.rerunning["run_id"], summary.last["run_id"]) == (
        "PASS", runs[1], runs[0])
    # Failed twice, then passed on the third attempt: flaky, one cell, no alert (two failed
    # attempts are one failure to the alert's count).
    summary, runs = attempts_table(("pass", 1, False), ("fail-pipeline_runs", 1, True),
                                   ("fail-pipeline_runs", 2, True), ("pass", 3, False))
    assert summary.status == "FLAKY" and summary.flakiness.flaky_cells == [runs[1:]]
    assert summary.regression is None and summary.rerunning is None
    # Every attempt failed: one confirmed failure, the regression's first failure its last.
    summary, runs = attempts_table(("pass", 1, False), ("fail-pipeline_runs", 1, True),
                                   ("fail-pipeline_runs", 2, False))
    assert summary.status == "FAILING" and summary.failing_streak == 1
    assert not summary.alert_open and summary.regression["first_fail"]["run_id"] == runs[2]
    # Its rerun refused (the budget): the failure stands, unconfirmed.
    summary, runs = attempts_table(("pass", 1, False), ("fail-pipeline_runs", 1, True),
                                   ("skip", 2, False))
    assert summary.status == "FAILING" and summary.rerunning is None
    # Only a failure awaiting its rerun on record: untested yet.
    summary, _ = attempts_table(("fail-pipeline_runs", 1, True))
    assert summary.status == "PENDING" and summary.rerunning is not None


@pytest.mark.daemon
@pytest.mark.slow
def test_from_the_ui_a_materialized_failure_is_rerun_by_the_daemon_and_recorded_flaky(
        tmp_path, dagster_home, instance):
    """The UI's path: Materialize on the partition through the webserver's GraphQL API; its
    first attempt fails (the seeded draw), the real daemon ticks the deflake_reruns sensor,
    which launches the rerun once under its run key, and it passes: the partition is flaky.
    (Slow: the sensor ticks every 15 s; its requests are covered in CI by the tests above.)"""
    from tests.support.dagster_services import LAUNCH_RUN, daemon, graphql, wait_until, webserver
    from tests.test_launch_paths import LIFECYCLE, asset_job_params

    path = registry(tmp_path, reruns=1)
    assert main(["--registry", str(path), "sync"]) == 0
    log = tmp_path / "daemon.log"
    with webserver(dagster_home, path, tmp_path / "web.log") as url, \
            daemon(dagster_home, path, log):
        launched = graphql(url, LAUNCH_RUN, {"params": asset_job_params(LIFECYCLE, KEY)})
        first = launched["launchPipelineExecution"]["run"]["runId"]
        rerun = wait_until(lambda: next(iter(instance.get_runs(dg.RunsFilter(
            tags={"mlci/rerun_of": first}, statuses=[dg.DagsterRunStatus.SUCCESS]))), None),
            240, "the rerun to pass", log, interval_s=2)
        time.sleep(20)  # a later tick of the sensor asks for nothing more
    assert rerun.tags["dagster/sensor_name"] == "deflake_reruns"
    assert rerun.tags["dagster/run_key"] == f"rerun:{first}:2"
    assert rerun.tags["mlci/attempt"] == "2"
    assert len(instance.get_runs(dg.RunsFilter(tags={"mlci/rerun_of": first}))) == 1
    assert instance.get_run_by_id(first).status == dg.DagsterRunStatus.FAILURE
    summary = summary_of(instance)
    assert summary.status == "FLAKY" and summary.flakiness.flaky_cells == [[first, rerun.run_id]]
