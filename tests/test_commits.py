"""Commit sensors on a real git repository and a real Dagster instance: new commits and
pull-request heads run exactly the partitions their change needs, once per SHA and tier; a
force-push runs the new head only; a label runs its tier; and each run set's GitHub commit
status goes pending, then success or failure, once per state under a stable name (served by the
loopback GitHub of tests/support/github_api.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from mlci_dagster.assets.external import COMMIT_SUMMARY, PULL_REQUEST_LABEL
from mlci_dagster.cli import main
from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.operations import qualified_releases
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.tiers.commits import CommitError, label_event
from tests.support.git_repo import commit, git
from tests.support.github_api import GITHUB_TOKEN, REPO, FakeServices, serve_fake_services
from tests.support.registries import command_pipeline, config
from tests.support.runs import QUIET

TIERS = {"merge": {"trigger": "merge"},
         "pr": {"trigger": "pull_request", "selection": "changed"},
         "full": {"trigger": "label", "label": "run-full"},
         "smoke": {"trigger": "label", "label": "run-smoke", "selection": "changed"},
         "nightly": {"trigger": "nightly"}}
ALL = ["alpha|e1", "alpha|e2", "beta|e1", "beta|e2"]


def on_branch(repo: Path, branch: str, start: str, files: dict[str, str]) -> str:
    """A commit on `branch` (from `start`), leaving main checked out."""
    git(repo, "checkout", "-q", "-B", branch, start)
    sha = commit(repo, f"change on {branch}", files)
    git(repo, "checkout", "-q", "main")
    return sha


def registry_files(fail: str = "", **repository: Any) -> dict[str, str]:
    settings = {"engines": {"e1": {}, "e2": {}}, "tiers": TIERS, "repository": {
        "url": "..", "branches": ["main"], "pull_requests": True, **repository}}
    files = {"reg/mlci.yaml": yaml.safe_dump(settings)}
    for name in ("alpha", "beta"):
        code = "import sys; sys.exit(1)" if name == fail else "print('ok')"
        body = config(name, tiers=list(TIERS), paths=[f"src/{name}/**"],
                      pipelines=[command_pipeline("fit", code)])
        files[f"reg/configs/{name}.yaml"] = yaml.safe_dump(body)
    return files


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    """A repository holding the registry under reg/ and two sources, main at its first commit."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    commit(root, "first", {**registry_files(fail="beta"), "src/alpha/a.py": "a = 1\n",
                           "src/beta/b.py": "b = 1\n"})
    yield root


class Sensor:
    """Evaluates one sensor tick after tick with a real instance, carrying the cursor."""

    def __init__(self, instance: dg.DagsterInstance, registry: Path, name: str) -> None:
        self.instance = instance
        self.definitions = build_definitions(registry)
        self.sensor = self.definitions.resolve_sensor_def(name)
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources=self.definitions.resources) as context:
            result = self.sensor(context)
        if isinstance(result, dg.SensorResult):
            self.cursor = result.cursor or self.cursor
            for event in result.asset_events or []:  # stored as the daemon stores them
                self.instance.report_runless_asset_event(event)
            return result
        return dg.SensorResult(skip_reason=result)

    def requested(self) -> dict[str, set[str]]:
        """{"sha tier": partitions} of one tick's run requests, checking each request's tags."""
        found: dict[str, set[str]] = {}
        for request in self.tick().run_requests or []:
            sha, tier = request.tags["mlci/sha"], request.tags["mlci/tier"]
            key = str(request.partition_key)
            assert request.run_key == f"commit:{sha}:{tier}:{key}"
            found.setdefault(f"{sha} {tier}", set()).add(key)
        return found


def test_new_commits_and_pull_requests_run_what_their_change_needs_once(
        instance, dagster_home, repo):
    instance.add_dynamic_partitions("config", ["alpha", "beta"])
    main_sha = git(repo, "rev-parse", "HEAD")
    pr1 = on_branch(repo, "feat-a", "main", {"src/alpha/a.py": "a = 2\n"})
    git(repo, "update-ref", "refs/pull/1/head", pr1)
    sensor = Sensor(instance, repo / "reg", "commit_poll")

    first = sensor.tick()  # a fresh home: the heads as they are, nothing run
    assert first.run_requests == [] and first.skip_reason.skip_message.startswith(
        "first poll: 2 head(s)")
    assert json.loads(sensor.cursor)["refs"] == {"refs/heads/main": main_sha,
                                                 "refs/pull/1/head": pr1}
    pr1 = on_branch(repo, "feat-a", "feat-a", {"src/alpha/a.py": "a = 4\n"})  # a new push
    git(repo, "update-ref", "refs/pull/1/head", pr1)
    main_sha = commit(repo, "on main", {"src/gamma.py": "g = 1\n"})
    second = sensor.tick()
    by_set = {}
    for request in second.run_requests:
        by_set.setdefault((request.tags["mlci/sha"], request.tags["mlci/tier"]), []).append(
            request)
    assert {k: sorted(str(r.partition_key) for r in v) for k, v in by_set.items()} == {
        (main_sha, "merge"): ALL, (pr1, "pr"): ["alpha|e1", "alpha|e2"]}
    assert all(r.tags["mlci/pr"] == "1" and r.tags["mlci/runs"] == "2"
               for r in by_set[(pr1, "pr")])
    assert all("mlci/pr" not in r.tags for r in by_set[(main_sha, "merge")])
    assert sensor.requested() == {}  # the same heads: nothing again

    pr2 = on_branch(repo, "feat-b", "main", {"src/beta/b.py": "b = 2\n"})
    git(repo, "update-ref", "refs/pull/2/head", pr2)
    merged = commit(repo, "merge a", {"src/alpha/a.py": "a = 3\n"})
    assert sensor.requested() == {f"{pr2} pr": {"beta|e1", "beta|e2"},
                                  f"{merged} merge": set(ALL)}
    assert sensor.requested() == {}


def test_a_force_pushed_pull_request_runs_its_new_head_only(instance, dagster_home, repo):
    instance.add_dynamic_partitions("config", ["alpha", "beta"])
    old = on_branch(repo, "feat", "main", {"src/alpha/a.py": "a = 2\n"})
    git(repo, "update-ref", "refs/pull/7/head", old)
    sensor = Sensor(instance, repo / "reg", "commit_poll")
    sensor.tick()

    new = on_branch(repo, "feat", "main", {"src/beta/b.py": "b = 9\n"})  # rewritten history
    git(repo, "update-ref", "refs/pull/7/head", new)
    assert subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", old, new]
                          ).returncode == 1  # not a descendant
    assert sensor.requested() == {f"{new} pr": {"beta|e1", "beta|e2"}}
    assert json.loads(sensor.cursor)["refs"]["refs/pull/7/head"] == new
    git(repo, "update-ref", "refs/pull/7/head", old)  # pushed back: its runs exist already
    assert sensor.requested() == {f"{old} pr": {"alpha|e1", "alpha|e2"}}  # deduped by run key


def report_label(instance: dg.DagsterInstance, **metadata: Any) -> None:
    """What `POST /report_asset_materialization/pull_request_label` stores."""
    instance.report_runless_asset_event(dg.AssetMaterialization(PULL_REQUEST_LABEL,
                                                                metadata=metadata))


def test_a_label_runs_the_tier_it_names_for_the_pull_requests_head(
        instance, dagster_home, repo):
    instance.add_dynamic_partitions("config", ["alpha", "beta"])
    head = on_branch(repo, "feat", "main", {"src/alpha/a.py": "a = 2\n"})
    payload = {"action": "labeled", "number": 5, "label": {"name": "run-full"},
               "pull_request": {"number": 5, "head": {"sha": head}, "base": {"sha": "0" * 40}}}
    sensor = Sensor(instance, repo / "reg", "pr_label")
    report_label(instance, github_event=dg.MetadataValue.json(payload))
    report_label(instance, sha=head, label="just-a-label", pr=5)
    report_label(instance, github_event=json.dumps({**payload, "action": "unlabeled"}))
    report_label(instance, sha=head, label="run-smoke")  # planned against main: alpha only

    result = sensor.tick()
    assert [(r.tags["mlci/sha"], r.tags["mlci/tier"], r.tags.get("mlci/pr"),
             str(r.partition_key)) for r in result.run_requests] == [
        *((head, "full", "5", key) for key in ALL),
        (head, "smoke", None, "alpha|e1"), (head, "smoke", None, "alpha|e2")]
    assert sensor.requested() == {}  # each report is read once


def test_label_events_and_repository_settings_are_validated(tmp_path):
    with pytest.raises(CommitError, match="action 'unlabeled'"):
        label_event({"github_event": {"action": "unlabeled"}})
    with pytest.raises(CommitError, match="40-hex sha"):
        label_event({"sha": "abc", "label": "x"})
    files = registry_files(branches=[])
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(RegistryError, match="repository.branches"):
        load_registry(tmp_path / "reg")


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServices]:
    with serve_fake_services() as services:
        monkeypatch.setenv("MLCI_GITHUB_REPO", REPO)
        monkeypatch.setenv("MLCI_GITHUB_TOKEN", GITHUB_TOKEN)
        monkeypatch.setenv("MLCI_GITHUB_API_URL", f"{services.url}/api")
        monkeypatch.setenv("MLCI_DAGSTER_URL", "http://dagster.test")
        yield services


def run(instance: dg.DagsterInstance, registry: Path, key: str, sha: str, tier: str, size: int
        ) -> None:
    """One run of a run set, tagged as the commit sensors tag it."""
    instance.add_dynamic_partitions("config", [key.split("|")[0]])
    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                           run_config=QUIET, tags={"mlci/sha": sha, "mlci/tier": tier,
                                                   "mlci/runs": str(size)})


def test_the_commit_status_goes_pending_then_failure_once_and_a_passing_nightly_qualifies(
        instance, dagster_home, repo, github, capsys):
    registry, sha = repo / "reg", git(repo, "rev-parse", "HEAD")
    sensor = Sensor(instance, registry, "commit_status")
    assert sensor.tick().asset_events == []  # no run set yet

    run(instance, registry, "alpha|e1", sha, "merge", 2)
    github.fail_statuses = 1
    sensor.tick()  # GitHub answers 502: nothing recorded, retried on the next tick
    assert instance.fetch_observations(COMMIT_SUMMARY, limit=10).records == []
    sensor.tick()
    sensor.tick()
    assert [(s["sha"], s["context"], s["state"]) for s in github.statuses] == [
        (sha, "mlci / merge", "pending")]

    run(instance, registry, "beta|e1", sha, "merge", 2)  # beta's pipeline fails
    sensor.tick()
    sensor.tick()
    assert [s["state"] for s in github.statuses] == ["pending", "failure"]
    final = github.statuses[-1]
    assert final["context"] == "mlci / merge"
    assert final["description"] == "1 of 2 partitions passed; failing: beta|e1 (pipeline_runs)"
    assert final["target_url"].startswith("http://dagster.test/runs/")
    summaries = instance.fetch_observations(COMMIT_SUMMARY, limit=10).records
    assert [r.asset_observation.metadata["state"].value for r in summaries] == [
        "failure", "pending"]
    record = summaries[0].asset_observation.metadata["record"].value
    assert [(p["partition"], p["status"], p["failed_stage"]) for p in record["partitions"]] == [
        ("alpha|e1", "SUCCESS", None), ("beta|e1", "FAILURE", "pipeline_runs")]
    assert qualified_releases(instance) == []

    run(instance, registry, "alpha|e1", sha, "nightly", 1)
    sensor.tick()
    assert [(s["context"], s["state"]) for s in github.statuses[2:]] == [
        ("mlci / nightly", "success")]
    assert [q["sha"] for q in qualified_releases(instance)] == [sha]
    capsys.readouterr()
    assert main(["--registry", str(registry), "qualified", "--json"]) == 0
    assert [q["sha"] for q in json.loads(capsys.readouterr().out)] == [sha]


def test_a_quarantined_failure_passes_the_commit_status_until_its_quarantine_expires(
        instance, dagster_home, repo, github, capsys):
    """beta's pipeline fails. Quarantined, the nightly set is a success that names it, and the
    SHA qualifies; once the quarantine has expired the next set is a failure that says so."""
    registry, sha = repo / "reg", git(repo, "rev-parse", "HEAD")
    assert main(["--registry", str(registry), "quarantine", "add", "beta|e1", "--owner",
                 "ml-team", "--reason", "flaky since the Ray upgrade", "--issue",
                 "https://github.com/o/r/issues/7"]) == 0
    sensor = Sensor(instance, registry, "commit_status")
    for key in ("alpha|e1", "beta|e1"):
        run(instance, registry, key, sha, "nightly", 2)
    sensor.tick()
    final = github.statuses[-1]
    assert (final["context"], final["state"]) == ("mlci / nightly", "success")
    assert final["description"] == "1 of 2 partitions passed, 1 quarantined: beta|e1"
    assert [q["sha"] for q in qualified_releases(instance)] == [sha]
    (summary, *_) = instance.fetch_observations(COMMIT_SUMMARY, limit=1).records
    record = summary.asset_observation.metadata["record"].value
    assert [p["quarantined"] for p in record["partitions"]] == [
        "", f"beta|e1 (until {datetime.now(UTC).date() + timedelta(days=14)}, ml-team: flaky "
        "since the Ray upgrade)"]

    # Expired yesterday: beta counts again in the next set. The first set was judged on its
    # runs while the quarantine held: the edit is not applied to it backwards.
    path = registry / "quarantine.yaml"
    quarantine = yaml.safe_load(path.read_text())
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    quarantine["quarantine"][0]["expires"] = yesterday.isoformat()
    path.write_text(yaml.safe_dump(quarantine))
    later = "b" * 40
    for key in ("alpha|e1", "beta|e1"):
        run(instance, registry, key, later, "nightly", 2)
    sensor.tick()
    final = github.statuses[-1]
    assert (final["sha"], final["state"]) == (later, "failure")
    assert [s["state"] for s in github.statuses if s["sha"] == sha] == ["success"]
    assert final["description"] == ("1 of 2 partitions passed; failing: beta|e1 (pipeline_runs; "
                                    f"quarantine expired {yesterday})")
    assert [q["sha"] for q in qualified_releases(instance)] == [sha]
    capsys.readouterr()
    assert main(["--registry", str(registry), "quarantine", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:4] == ["beta|e1", "ml-team", str(yesterday), "EXPIRED"]
    assert main(["--registry", str(registry), "report"]) == 0
    assert (f"  beta|e1 (until {yesterday}, ml-team: flaky since the Ray upgrade): EXPIRED on "
            f"{yesterday}, counts again") in capsys.readouterr().out.splitlines()


def test_the_nightly_run_set_is_tagged_with_the_default_branch_head(instance, dagster_home, repo):
    instance.add_dynamic_partitions("config", ["alpha", "beta"])
    definitions = build_definitions(repo / "reg")
    nightly = definitions.resolve_schedule_def("nightly")
    with dg.build_schedule_context(instance=instance, resources=definitions.resources,
                                   repository_def=definitions.get_repository_def(),
                                   scheduled_execution_time=datetime(2026, 12, 1, 2, tzinfo=UTC)
                                   ) as context:
        requests = nightly.evaluate_tick(context).run_requests
    assert sorted(str(r.partition_key) for r in requests) == ALL
    assert {(r.tags["mlci/sha"], r.tags["mlci/tier"], r.tags["mlci/runs"]) for r in requests} == {
        (git(repo, "rev-parse", "main"), "nightly", "4")}
