"""Culprit searches on a real git repository and a real Dagster instance: a partition passes at
one commit and fails at a later one; the culprit_search sensor (or `mlci culprit find`) reruns
it at commits in between, each rerun a Dagster run whose image is built from its commit's
files, and names the commit that broke it, confirmed by a rerun of it and its parent. The
searches that may not start are refused with their reason, before any run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlci_dagster.cli import main
from mlci_dagster.culprits.search import SearchRefused, worst_case_runs
from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.event_log import new_results
from mlci_dagster.history.analysis import analyze
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.notify.notifier import NotifierState
from mlci_dagster.paths import mlci_home
from mlci_dagster.registry import load_registry
from mlci_dagster.registry.models import HistorySettings
from mlci_dagster.searches import latest_searches, open_search
from mlci_dagster.sensors.notify import collect
from tests.support.culprit_repo import PARTITION, make_repo, settings
from tests.support.daemon import RUN_KEY_TAG, launch
from tests.support.runs import QUIET, result_record


def run_at(instance: dg.DagsterInstance, registry: Path, sha: str) -> None:
    """The partition's lifecycle at commit `sha`, as a tier's run of that commit is tagged."""
    instance.add_dynamic_partitions("config", ["model"])
    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False,
                           run_config=QUIET, tags={"mlci/sha": sha, "mlci/tier": "nightly",
                                                   "mlci/runs": "1"})


def tick(instance: dg.DagsterInstance, registry: Path, cursor: str | None
         ) -> tuple[dg.SensorResult, str | None]:
    definitions = build_definitions(registry)
    sensor = definitions.resolve_sensor_def("culprit_search")
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources=definitions.resources) as context:
        result = sensor(context)
    if isinstance(result, dg.SkipReason):
        return dg.SensorResult(skip_reason=result), cursor
    for event in result.asset_events or []:  # stored as the daemon stores them
        instance.report_runless_asset_event(event)
    return result, result.cursor or cursor


def test_the_sensor_names_and_confirms_the_culprit_at_width_three(instance, dagster_home,
                                                                   tmp_path, capsys):
    shas = make_repo(tmp_path / "repo", 8, breaks=6)
    registry = tmp_path / "repo" / "reg"
    _, cursor = tick(instance, registry, None)  # the first tick starts after what is on record
    run_at(instance, registry, shas[0])
    run_at(instance, registry, shas[-1])

    rounds, requested = 0, []
    while True:
        result, cursor = tick(instance, registry, cursor)
        if not result.run_requests:
            break
        requested += [r.run_key for r in result.run_requests]
        # A tick before the daemon made runs of them asks again, under the same run keys.
        again, cursor = tick(instance, registry, cursor)
        assert [r.run_key for r in again.run_requests] == [r.run_key for r in
                                                           result.run_requests]
        launch(instance, registry, mlci_home(), "culprit_search", result.run_requests)
        rounds += 1
        assert rounds <= 4

    (found,) = latest_searches(instance).values()
    assert found["state"] == "confirmed"
    assert found["culprit"] == shas[5]
    assert found["text"].startswith(f"culprit: {shas[5][:12]} change 6: lower the accuracy, "
                                    "confirmed by runs ")
    reruns = instance.get_runs(dg.RunsFilter(tags={"mlci/culprit_search": found["search"]["id"]}))
    # Width 3 on 7 commits: one round of 3 splits it to one commit, one round verifies.
    assert rounds == 2 and len(reruns) == 5 <= worst_case_runs(7, 3)
    assert len({r.tags[RUN_KEY_TAG] for r in reruns}) == len(reruns) == len(set(requested))
    assert {(r.tags["mlci/sha"], r.tags["mlci/rerun_kind"]) for r in reruns} >= {
        (shas[5], "verification"), (shas[4], "verification")}
    assert {r.tags["mlci/trigger"] for r in reruns} == {"culprit-search"}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS or r.tags["mlci/sha"] in shas[5:]
               for r in reruns)
    # Each rerun's image was built from its commit: one build per commit, none reused.
    records = [r for _, r in new_results(instance, 0) if r.out_of_line]
    assert len({r.image_digest for r in records}) == len({r.sha for r in records})
    assert list((dagster_home / "mlci" / "checkouts").iterdir()) == []  # nothing left behind

    # The reruns of older commits count in no partition's state: it is failing still, and
    # the notifier announces the culprit, not a "resolved".
    table = append_rows(None, [record_to_row(r, i) for i, r in new_results(instance, 0)])
    (summary,) = analyze(table, [PARTITION], HistorySettings(), now=time.time())
    assert summary.status == "FAILING" and summary.last["sha"] == shas[-1]
    notifications = collect(instance, NotifierState(), "http://dagster.test")
    kinds = [str(n.kind) for n in notifications]
    assert "resolved" not in kinds and kinds.count("culprit") == 1
    culprit = next(n for n in notifications if n.kind == "culprit")
    assert culprit.verdict == found["text"] and culprit.partitions == [PARTITION]
    assert culprit.signature == found["search"]["signature"]
    # The partition's regression names it too (`mlci report`, the history's checks).
    capsys.readouterr()
    assert main(["--registry", str(registry), "report", "--json"]) == 0
    (partition,) = json.loads(capsys.readouterr().out)["partitions"]
    assert partition["regression"]["culprit"]["commit"] == shas[5]
    assert main(["--registry", str(registry), "report"]) == 0
    assert f"culprit: {shas[5][:12]} change 6" in capsys.readouterr().out


def test_a_midpoint_failing_otherwise_stops_the_search_with_that_reason(
        instance, dagster_home, tmp_path, capsys):
    """`mlci culprit find`, width 1: the first midpoint (commit 5) fails with a KeyError, not
    the regression's ValueError: the search stops, naming it, and starts nothing more."""
    shas = make_repo(tmp_path / "repo", 8, breaks=7, other=(5,), max_width=1)
    registry = tmp_path / "repo" / "reg"
    run_at(instance, registry, shas[0])
    run_at(instance, registry, shas[-1])
    capsys.readouterr()
    assert main(["--registry", str(registry), "culprit", "find", PARTITION]) == 1
    out = capsys.readouterr().out
    assert f"no culprit: {shas[4]} failed with another signature (1 reruns in 1 rounds)" in out
    assert main(["--registry", str(registry), "culprit", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["state"] == "stopped" and listed["search"]["driver"] == "cli"
    assert [(r["commit"], r["status"]) for r in listed["reruns"]] == [
        (shas[4], "other_signature")]


# --- refusals: results on record, no lifecycle run ----------------------------------------


def record_results(instance: dg.DagsterInstance, partition: str, shas: list[str | None],
                   passes: list[bool], **fields: object) -> None:
    for i, (sha, ok) in enumerate(zip(shas, passes, strict=True)):
        record = result_record(partition, "pass" if ok else "fail-pipeline_runs",
                               time.time() - 300 + i * 100)
        record = record.model_copy(update={"sha": sha, **fields})
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "results", partition=partition,
            metadata={"record": dg.MetadataValue.json(record.to_json())}))


@pytest.fixture
def long_range(tmp_path):
    """16 commits (no run of them): the registry under reg/, its settings rewritten per test."""
    shas = make_repo(tmp_path / "repo", 16, breaks=11)
    return tmp_path / "repo" / "reg", shas


def rewrite_settings(registry: Path, **extra: object) -> None:
    (registry / "mlci.yaml").write_text(yaml.safe_dump({**settings(), **extra}))


def refusal(instance, registry: Path) -> str:
    with pytest.raises(SearchRefused) as refused:
        open_search(instance, load_registry(registry), mlci_home(), PARTITION, driver="cli")
    assert instance.fetch_observations(dg.AssetKey("culprit_search"), limit=5).records == []
    return str(refused.value)


def test_a_search_over_its_maximum_runs_is_refused(instance, dagster_home, long_range):
    registry, shas = long_range
    rewrite_settings(registry, culprit_search={"max_runs": 5})
    record_results(instance, PARTITION, [shas[0], shas[-1]], [True, False])
    assert refusal(instance, registry) == (
        "naming and confirming a culprit among 15 commits takes up to 6 reruns, over "
        "culprit_search.max_runs 5")
    rewrite_settings(registry, culprit_search={"max_runs": 6})
    search, new = open_search(instance, load_registry(registry), mlci_home(), PARTITION,
                              driver="cli")
    assert new and search.width == 1 and search.commits == shas[1:]


def test_a_search_over_the_budget_is_refused(instance, dagster_home, long_range):
    """A billed config (a TPU VM at $1.20/h) with $10 spent of $20 this month: up to 8
    reruns at width 3, at the median $5 recorded, would pass it."""
    registry, shas = long_range
    body = yaml.safe_load((registry / "configs" / "model.yaml").read_text())
    body["sandbox"] = {"provider": "gcp-tpu-vm", "project": "my-project-1", "zone": "us-west4-a",
                       "accelerator_type": "v5litepod-1", "runtime_version": "v2-alpha-tpuv5-lite",
                       "ssh": {"user": "mlci", "private_key_env": "KEY"}}
    body["pipelines"] = [{"kind": "ssh_command", "name": "evaluate", "command": "true"}]
    body.pop("ui_smoke")
    body["timeouts"] = {"sandbox_s": 1800, "pipeline_runs_s": 3600, "ui_smoke_s": 60}
    (registry / "configs" / "model.yaml").write_text(yaml.safe_dump(body))
    rewrite_settings(registry, secrets=["KEY"], costs={"hourly_usd": {"v5litepod-1": 1.2}},
                     budget={"monthly_usd": 20})
    record_results(instance, PARTITION, [shas[0], shas[-1]], [True, False], cost_usd=5.0)
    why = refusal(instance, registry)
    assert why == ("budget: up to 8 reruns at $5.0000 each would take the month to $50.0000, "
                   "over budget.monthly_usd $20 (spent or in progress: $10.0000)")


@pytest.mark.parametrize(("shas_of", "passes", "kind", "expected"), [
    (lambda s: [s[0], s[0]], [True, False], None, "the range is one commit"),
    (lambda s: [None, None], [True, False], None, "did not test a commit"),
    (lambda s: [s[0], s[-1]], [True, True], None, "the partition passes now"),
    (lambda s: [s[0], s[-1]], [True, False], "infra", "only product and timeout failures"),
    (lambda s: [s[-1], s[0]], [True, False], None, "is not an ancestor of"),
])
def test_a_regression_with_nothing_to_bisect_is_refused_saying_why(
        instance, dagster_home, long_range, shas_of, passes, kind, expected):
    registry, shas = long_range
    record_results(instance, PARTITION, shas_of(shas), passes,
                   **({"failure_kind": kind} if kind else {}))
    assert expected in refusal(instance, registry)


@pytest.mark.parametrize(("partition", "expected"), [
    ("nope", "partition key 'nope': expected 'config|engine'"),
    ("model|e9", "model|e9: not a partition of the registry (expected one of: model|e1)"),
    ("other|e1", "other|e1: not a partition of the registry (expected one of: model|e1)"),
])
def test_a_partition_the_registry_lacks_is_refused_naming_the_ones_it_has(
        instance, dagster_home, long_range, partition, expected):
    registry, _ = long_range
    with pytest.raises(SearchRefused) as refused:
        open_search(instance, load_registry(registry), mlci_home(), partition, driver="cli")
    assert str(refused.value) == expected


def test_the_find_culprit_job_opens_a_search_for_the_sensor_or_fails_saying_why(
        instance, dagster_home, long_range):
    """The UI's path (the Launchpad runs the find_culprit job): the search it opens is the
    sensor's to run; a refusal fails the run with its reason."""
    registry, shas = long_range
    record_results(instance, PARTITION, [shas[0], shas[-1]], [True, False])
    job = build_definitions(registry).resolve_job_def("find_culprit")

    def launch_job(**config: str) -> dg.ExecuteInProcessResult:
        return job.execute_in_process(instance=instance, raise_on_error=False, run_config={
            "ops": {"open_culprit_search": {"config": {"partition": PARTITION, **config}}}})

    refused = launch_job(good=shas[3])  # no result on record at that commit
    assert not refused.success
    (failure,) = refused.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == (
        f"{PARTITION}: not searched: no passing result at commit {shas[3]} among the "
        "partition's last 200")
    assert launch_job().success
    (found,) = latest_searches(instance).values()
    assert found["state"] == "running" and found["search"]["driver"] == "sensor"
    assert found["search"]["commits"] == shas[1:] and found["search"]["width"] == 3


def test_the_janitor_removes_the_commit_tree_a_killed_build_left(instance, dagster_home,
                                                                 tmp_path, capsys):
    """A build killed mid-way leaves its commit tree (named by its process): the janitor
    removes it once that process is gone, and never one whose process lives."""
    import subprocess
    import sys

    make_repo(tmp_path / "repo", 2, breaks=3)
    checkouts = dagster_home / "mlci" / "checkouts"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (checkouts / f"{dead}-0123456789ab-x1" / "tree").mkdir(parents=True)
    live = checkouts / f"{os.getpid()}-0123456789ab-x2"
    live.mkdir()
    assert main(["--registry", str(tmp_path / "repo" / "reg"), "janitor"]) == 0
    assert f"{dead}-0123456789ab-x1: a killed build's commit tree; removed" in \
        capsys.readouterr().out
    assert [p.name for p in checkouts.iterdir()] == [live.name]


JOB_LAUNCH = {"mode": "default", "selector": {
    "repositoryLocationName": "mlci_dagster.definitions", "repositoryName": "__repository__",
    "pipelineName": "find_culprit"}}


@pytest.mark.daemon
@pytest.mark.slow
def test_from_the_ui_find_culprit_and_the_daemon_name_the_culprit(tmp_path, dagster_home,
                                                                  instance):
    """The UI's Launchpad path, through the webserver's GraphQL API: the find_culprit job opens
    the search, the real daemon ticks the culprit_search sensor, which launches the reruns as
    the lifecycle job, and the culprit is named. (Slow: the sensor ticks every 30 s; the job's
    op and the sensor's requests are covered in CI by the tests above.)"""
    from tests.support.dagster_services import LAUNCH_RUN, daemon, graphql, wait_until, webserver

    shas = make_repo(tmp_path / "repo", 8, breaks=6)
    registry = tmp_path / "repo" / "reg"
    run_at(instance, registry, shas[0])
    run_at(instance, registry, shas[-1])
    log = tmp_path / "daemon.log"
    with webserver(dagster_home, registry, tmp_path / "web.log") as url, \
            daemon(dagster_home, registry, log):
        launched = graphql(url, LAUNCH_RUN, {"params": {
            **JOB_LAUNCH, "runConfigData": {"ops": {"open_culprit_search": {
                "config": {"partition": PARTITION}}}}}})
        assert launched["launchPipelineExecution"]["__typename"] == "LaunchRunSuccess", launched
        found = wait_until(lambda: next((f for f in latest_searches(instance).values()
                                         if f["state"] == "confirmed"), None), 400,
                           "the search to confirm its culprit", log, interval_s=2)
    assert found["culprit"] == shas[5] and found["search"]["driver"] == "sensor"
    reruns = instance.get_runs(dg.RunsFilter(tags={"mlci/culprit_search": found["search"]["id"]}))
    assert {r.tags["dagster/sensor_name"] for r in reruns} == {"culprit_search"}
    assert len({r.tags["dagster/run_key"] for r in reruns}) == len(reruns) == 5
