"""Notifications on a real instance: failed lifecycles, recoveries and new regression alerts
reach a Slack-compatible webhook and one GitHub issue per partition, served here by a loopback
HTTP server that answers like GitHub and records every request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from mlci_dagster.definitions import HISTORY_JOB, build_definitions
from mlci_dagster.notify import GitHubIssues, Notification, NotifyError, issue_title
from mlci_dagster.notify.message import Kind
from mlci_dagster.notify.notifier import GITHUB, WEBHOOK, Notifier, Pending, deliver_in_order
from mlci_dagster.notify.webhook import Webhook
from tests.conftest import QUIET, command_pipeline, config, run_partition, write_registry
from tests.support.github_api import GITHUB_TOKEN, REPO, FakeServices, serve_fake_services

WEBHOOK_TOKEN = "whk-5e1f0c2b9a8d7e6f"


@pytest.fixture
def services() -> Iterator[FakeServices]:
    with serve_fake_services() as state:
        yield state


@pytest.fixture
def notify_env(services: FakeServices, monkeypatch: pytest.MonkeyPatch) -> FakeServices:
    monkeypatch.setenv("MLCI_WEBHOOK_URL", f"{services.url}/hook")
    monkeypatch.setenv("MLCI_WEBHOOK_TOKEN", WEBHOOK_TOKEN)
    monkeypatch.setenv("MLCI_GITHUB_REPO", REPO)
    monkeypatch.setenv("MLCI_GITHUB_TOKEN", GITHUB_TOKEN)
    monkeypatch.setenv("MLCI_GITHUB_API_URL", f"{services.url}/api")
    monkeypatch.setenv("MLCI_DAGSTER_URL", "http://dagster.test")
    return services


def switchable_registry(tmp_path: Path) -> tuple[Path, Path]:
    """A registry whose pipeline passes or fails as a file says: (registry, that file)."""
    mode = tmp_path / "mode"
    mode.write_text("fail")
    code = (f"import sys; ok = open({str(mode)!r}).read() == 'pass'; "
            "print('loss diverged at step 7', file=sys.stderr) if not ok else None; "
            "sys.exit(0 if ok else 3)")
    registry = write_registry(tmp_path / "reg", [config(
        "train", owners={"default": "test-team", "pipeline_runs": "ml-team"},
        pipelines=[command_pipeline("fit", code)])])
    return registry, mode


class SensorDriver:
    """Evaluates the notify sensor tick after tick, carrying the cursor as the daemon would."""

    def __init__(self, instance: dg.DagsterInstance, registry: Path) -> None:
        self.instance = instance
        self.definitions = build_definitions(registry)
        self.sensor = self.definitions.resolve_sensor_def("notify")
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources=self.definitions.resources) as context:
            result = self.sensor(context)
        self.cursor = result.cursor
        return result

    def update_history(self) -> None:
        job = self.definitions.resolve_job_def(HISTORY_JOB)
        assert job.execute_in_process(instance=self.instance, run_config=QUIET,
                                      raise_on_error=False).success


def test_failure_opens_one_issue_then_comments_then_recovery_closes_it(
    instance, dagster_home, tmp_path, notify_env, capfd
):
    services = notify_env
    registry, mode = switchable_registry(tmp_path)
    driver = SensorDriver(instance, registry)
    driver.tick()  # the first tick starts after what is already recorded
    assert services.requests == []

    # A failed lifecycle: one webhook post, one issue naming stage, owner, summary and run.
    first, record = run_partition(instance, registry, "train|e1")
    driver.tick()
    assert record["status"] == "fail-pipeline_runs"
    assert len(services.hooks) == 1
    hook_text = json.dumps(services.hooks[0])
    assert services.hooks[0]["text"].startswith(":red_circle: mlci: train|e1 failed at "
                                                "pipeline_runs")
    for expected in ("pipeline_runs", "ml-team", "loss diverged at step 7",
                     f"http://dagster.test/runs/{first.run_id}"):
        assert expected in hook_text
    assert list(services.issues) == [1]
    issue = services.issues[1]
    assert issue["title"] == issue_title("train|e1") == "mlci: train|e1 failing"
    assert issue["labels"] == ["mlci"]
    for expected in ("pipeline_runs", "ml-team", "loss diverged at step 7",
                     f"http://dagster.test/runs/{first.run_id}", record["debug_bundle"]):
        assert expected in issue["body"]
    github_calls = [r for r in services.requests if r.path.startswith("/api")]
    assert all(r.headers["Accept"] == "application/vnd.github+json" for r in github_calls)
    assert services.of("GET", "/issues")[0].query == {
        "state": ["open"], "labels": ["mlci"], "per_page": ["100"], "page": ["1"]}

    # The same partition fails again: a comment on the same issue, no second issue. Two
    # failures in a row open the history alert: announced once, as a regression.
    second, _ = run_partition(instance, registry, "train|e1")
    driver.update_history()
    driver.tick()
    driver.tick()  # nothing new: nothing sent twice
    assert list(services.issues) == [1]
    assert len(services.comments[1]) == 2
    assert f"http://dagster.test/runs/{second.run_id}" in services.comments[1][0]
    assert "regressed" in services.comments[1][1]
    assert "no passing run on record" in services.comments[1][1]
    assert [h["text"].split(" mlci: ")[0] for h in services.hooks] == [
        ":red_circle:", ":red_circle:", ":rotating_light:"]

    # It passes: a recovery post, a comment, and the issue closed.
    mode.write_text("pass")
    third, record = run_partition(instance, registry, "train|e1")
    driver.tick()
    assert record["status"] == "pass"
    assert services.hooks[-1]["text"] == ":large_green_circle: mlci: train|e1 passes again"
    assert len(services.comments[1]) == 3
    assert f"http://dagster.test/runs/{third.run_id}" in services.comments[1][2]
    assert services.issues[1]["state"] == "closed"
    assert len(services.of("PATCH", "/issues/1")) == 1

    # The tokens went only into Authorization headers: not into bodies, logs or storage.
    logged = capfd.readouterr().err
    assert "notify: 1 new, 1 delivered, 0 pending" in logged  # the log is really captured
    assert {r.headers.get("Authorization") for r in services.requests} == {
        f"Bearer {WEBHOOK_TOKEN}", f"Bearer {GITHUB_TOKEN}"}
    for token in (WEBHOOK_TOKEN, GITHUB_TOKEN):
        assert all(token not in json.dumps(r.body) for r in services.requests)
        assert all(token not in json.dumps(r.headers) for r in services.requests
                   if r.headers.get("Authorization") != f"Bearer {token}")
        leaks = [p for p in dagster_home.rglob("*")
                 if p.is_file() and token.encode() in p.read_bytes()]
        assert leaks == []
        assert token not in logged
        assert token not in (driver.cursor or "")
        for run in (first, second, third):
            assert all(token not in str(e) for e in instance.all_logs(run.run_id))


def test_a_failed_post_is_kept_in_the_cursor_and_sent_on_the_next_tick(
    instance, dagster_home, tmp_path, notify_env, capfd
):
    services = notify_env
    registry, _ = switchable_registry(tmp_path)
    driver = SensorDriver(instance, registry)
    driver.tick()
    run, _ = run_partition(instance, registry, "train|e1")
    services.fail_webhook = 1

    driver.tick()  # the webhook is down; GitHub takes it
    pending = json.loads(driver.cursor)["pending"]
    assert [(p["notification"]["run_id"], p["channels"]) for p in pending] == [
        (run.run_id, ["webhook"])]
    logged = capfd.readouterr().err  # the sensor's log, as the daemon would keep it
    assert "not delivered to ['webhook']" in logged and "HTTP 500" in logged
    assert len(services.issues) == 1

    # A new driver reads only the stored cursor, as a restarted daemon would.
    restarted = SensorDriver(instance, registry)
    restarted.cursor = driver.cursor
    restarted.tick()

    assert len(services.of("POST", "/hook")) == 2  # the failed one, then the retry
    assert run.run_id in json.dumps(services.hooks[-1])
    assert json.loads(restarted.cursor)["pending"] == []
    assert len(services.issues) == 1 and services.comments[1] == []  # GitHub not asked twice


def test_without_configuration_the_sensor_sends_nothing(
    instance, dagster_home, tmp_path, services, monkeypatch
):
    for var in ("MLCI_WEBHOOK_URL", "MLCI_WEBHOOK_TOKEN", "MLCI_GITHUB_REPO",
                "MLCI_GITHUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    registry, _ = switchable_registry(tmp_path)
    driver = SensorDriver(instance, registry)
    run_partition(instance, registry, "train|e1")

    result = driver.tick()

    assert "notifier disabled" in str(result.skip_reason)
    assert services.requests == []


def test_failure_of_one_channel_holds_later_notifications_of_that_partition(services):
    notifier = Notifier(Webhook(f"{services.url}/hook"),
                        GitHubIssues(REPO, GITHUB_TOKEN, f"{services.url}/api"))
    failure = Notification(Kind.FAILURE, "a|e1", "a|e1 failed", run_id="r1")
    recovery = Notification(Kind.RECOVERY, "a|e1", "a|e1 passes again", run_id="r2")
    other = Notification(Kind.FAILURE, "b|e1", "b|e1 failed", run_id="r3")
    services.fail_webhook = 1

    pending, failures = deliver_in_order(notifier, [
        Pending(n, [WEBHOOK, GITHUB]) for n in (failure, recovery, other)])

    # a's failure missed the webhook, so a's recovery waits for it there; b is not held up.
    assert [(p.notification.run_id, p.channels) for p in pending] == [
        ("r1", [WEBHOOK]), ("r2", [WEBHOOK])]
    assert len(failures) == 1 and "HTTP 500" in failures[0]
    assert services.issues[1]["state"] == "closed"  # GitHub took a's failure and recovery
    assert [i["title"] for i in services.issues.values()] == [issue_title("a|e1"),
                                                              issue_title("b|e1")]


def test_github_errors_name_the_call_and_never_the_token(services):
    issues = GitHubIssues(REPO, "wrong-token-123456", f"{services.url}/api")

    with pytest.raises(NotifyError) as error:
        issues.find_open_issue("a|e1")

    assert f"GET {services.url}/api/repos/{REPO}/issues: HTTP 401" in str(error.value)
    assert "wrong-token-123456" not in str(error.value)


def test_tokens_are_configured_as_env_vars_never_as_values(tmp_path, notify_env):
    registry, _ = switchable_registry(tmp_path)

    notifier = build_definitions(registry).resources["notifier"]

    assert isinstance(notifier.webhook_token, dg.EnvVar)
    assert isinstance(notifier.github_token, dg.EnvVar)
    assert (notifier.webhook_token.env_var_name, notifier.github_token.env_var_name) == (
        "MLCI_WEBHOOK_TOKEN", "MLCI_GITHUB_TOKEN")
    assert WEBHOOK_TOKEN not in repr(notifier) and GITHUB_TOKEN not in repr(notifier)


def test_definitions_carry_the_notify_sensor_and_a_disabled_notifier_by_default(
    tmp_path, monkeypatch
):
    for var in ("MLCI_WEBHOOK_URL", "MLCI_GITHUB_REPO", "MLCI_GITHUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    registry, _ = switchable_registry(tmp_path)

    definitions = build_definitions(registry)

    assert definitions.resolve_sensor_def("notify").name == "notify"
    assert not definitions.resources["notifier"].notifier().enabled
