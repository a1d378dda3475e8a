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
from tests.support.github_api import GITHUB_TOKEN, REPO, FakeServices, serve_fake_services
from tests.support.registries import command_pipeline, config, write_registry
from tests.support.runs import QUIET, run_partition

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


def switchable_registry(tmp_path: Path, names: tuple[str, ...] = ("train",)
                        ) -> tuple[Path, Path]:
    """A registry whose configs' pipeline passes or fails as a file says (the same way in each:
    one signature): (registry, that file)."""
    mode = tmp_path / "mode"
    mode.write_text("fail")
    code = (f"import sys; ok = open({str(mode)!r}).read() == 'pass'; "
            "print('loss diverged at step 7', file=sys.stderr) if not ok else None; "
            "sys.exit(0 if ok else 3)")
    registry = write_registry(tmp_path / "reg", [config(
        name, owners={"default": "test-team", "pipeline_runs": "ml-team"},
        pipelines=[command_pipeline("fit", code)]) for name in names])
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
        self.cursor, self.last = result.cursor, result
        return result

    def update_history(self) -> None:
        job = self.definitions.resolve_job_def(HISTORY_JOB)
        assert job.execute_in_process(instance=self.instance, run_config=QUIET,
                                      raise_on_error=False).success


def test_a_signature_opens_one_issue_spreads_regresses_and_resolves_once(
    instance, dagster_home, tmp_path, notify_env, capfd
):
    services = notify_env
    registry, mode = switchable_registry(tmp_path, ("train-a", "train-b", "train-c"))
    driver = SensorDriver(instance, registry)
    driver.tick()  # the first tick starts after what is already recorded
    assert services.requests == []

    # Two partitions fail the same way: one webhook post and one issue, naming both.
    first, record = run_partition(instance, registry, "train-a|e1")
    run_partition(instance, registry, "train-b|e1")
    driver.tick()
    assert record["status"] == "fail-pipeline_runs"
    assert len(services.hooks) == 1
    hook_text = json.dumps(services.hooks[0])
    assert services.hooks[0]["text"].startswith(
        ":red_circle: mlci: new failure: 2 partitions (train-a|e1, train-b|e1) fail with "
        "pipeline_runs/product: pipeline 'fit': exited <n>, expected <n>")
    for expected in ("ml-team", "loss diverged at step 7",
                     f"http://dagster.test/runs/{first.run_id}"):
        assert expected in hook_text
    assert list(services.issues) == [1]
    issue = services.issues[1]
    signature = issue["title"].rsplit("[", 1)[1].rstrip("]")
    assert issue["title"] == issue_title(signature, "pipeline_runs/product: pipeline 'fit': "
                                                    "exited <n>, expected <n>")
    assert issue["labels"] == ["mlci"]
    # The log and bundle as the artifact store serves them (here the default directory's
    # file:// URLs; tests/test_evidence_links.py follows them on S3).
    stored = {a["kind"]: a["url"] for a in record["artifacts"].values()}
    for expected in ("train-a|e1, train-b|e1", "ml-team", "loss diverged at step 7",
                     f"http://dagster.test/runs/{first.run_id}", stored["bundle"]):
        assert expected in issue["body"]
    assert record["debug_bundle"] not in issue["body"]
    github_calls = [r for r in services.requests if r.path.startswith("/api")]
    assert all(r.headers["Accept"] == "application/vnd.github+json" for r in github_calls)
    assert services.of("GET", "/issues")[0].query == {
        "state": ["open"], "labels": ["mlci"], "per_page": ["100"], "page": ["1"]}

    # train-a fails again: the same signature, nothing new to say; its second failure in a row
    # opens the history alert, announced once as a regression, on the same issue.
    second, _ = run_partition(instance, registry, "train-a|e1")
    driver.update_history()
    driver.tick()
    driver.tick()  # nothing new: nothing sent twice
    assert list(services.issues) == [1]
    assert len(services.comments[1]) == 1
    assert "regressed: 1 partition (train-a|e1)" in services.comments[1][0]
    assert "no passing run on record" in services.comments[1][0]

    # A third partition fails the same way: it spreads, one more comment.
    run_partition(instance, registry, "train-c|e1")
    driver.tick()
    assert "spreads to: 1 partition (train-c|e1)" in services.comments[1][1]

    # They pass: one resolved post, a comment, and the issue closed.
    mode.write_text("pass")
    for name in ("train-a", "train-b", "train-c"):
        last, record = run_partition(instance, registry, f"{name}|e1")
        assert record["status"] == "pass"
        driver.tick()
    assert [h["text"].split(" mlci: ")[0] for h in services.hooks] == [
        ":red_circle:", ":rotating_light:", ":red_circle:", ":large_green_circle:"]
    assert services.hooks[-1]["text"].startswith(":large_green_circle: mlci: resolved: no "
                                                 "partition fails with pipeline_runs/product")
    assert len(services.comments[1]) == 3
    assert f"http://dagster.test/runs/{last.run_id}" in services.comments[1][2]
    assert services.issues[1]["state"] == "closed"
    assert len(services.of("PATCH", "/issues/1")) == 1
    assert services.completions == []  # no root-cause analyzer unless configured

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
        for run in (first, second, last):
            assert all(token not in str(e) for e in instance.all_logs(run.run_id))


def test_two_causes_across_a_matrix_are_two_signatures_and_two_notifications(
    instance, dagster_home, tmp_path, notify_env
):
    """Six partitions: four fail in their pipeline with one ValueError (other numbers each
    time), two fail ui_smoke with a 404; two notifications, two issues, nothing per partition."""
    services = notify_env
    diverge = command_pipeline("fit", "import random; raise ValueError(f'loss diverged at step "
                                      "{random.randint(2, 99)}')")
    missing_page = {"routes": [{"service": "web", "path": "/report.html"}]}
    registry = write_registry(tmp_path / "reg", [
        config("alpha", pipelines=[diverge]), config("beta", pipelines=[diverge]),
        config("gamma", ui_smoke=missing_page)], engines={"e1": {}, "e2": {}})
    driver = SensorDriver(instance, registry)
    driver.tick()

    for key in ("alpha|e1", "alpha|e2", "beta|e1", "beta|e2", "gamma|e1", "gamma|e2"):
        run_partition(instance, registry, key)
    driver.tick()

    assert sorted(h["text"] for h in services.hooks) == [
        ":red_circle: mlci: new failure: 2 partitions (gamma|e1, gamma|e2) fail with "
        "ui_smoke/product: http://<host>/report.html: status <n>, expected <n>",
        ":red_circle: mlci: new failure: 4 partitions (alpha|e1, alpha|e2, beta|e1, ...) fail "
        "with pipeline_runs/product: ValueError: loss diverged at step <n>"]
    assert len(services.issues) == 2
    [observation] = driver.last.asset_events
    assert sorted((e["event"], len(e["partitions"])) for e in
                  observation.metadata["entries"].value) == [("signature", 2), ("signature", 4)]


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


def test_failure_of_one_channel_holds_later_notifications_of_that_signature(services):
    notifier = Notifier(Webhook(f"{services.url}/hook"),
                        GitHubIssues(REPO, GITHUB_TOKEN, f"{services.url}/api"))
    failure = Notification(Kind.SIGNATURE, "aaaaaaaaaaaa", "new failure", "stage/kind: a",
                           ["a|e1"], run_id="r1")
    resolved = Notification(Kind.RESOLVED, "aaaaaaaaaaaa", "resolved", "stage/kind: a",
                            ["a|e1"], run_id="r2")
    other = Notification(Kind.SIGNATURE, "bbbbbbbbbbbb", "new failure", "stage/kind: b",
                         ["b|e1"], run_id="r3")
    services.fail_webhook = 1

    pending, failures = deliver_in_order(notifier, [
        Pending(n, [WEBHOOK, GITHUB]) for n in (failure, resolved, other)])

    # a's failure missed the webhook, so a's resolution waits for it there; b is not held up.
    assert [(p.notification.run_id, p.channels) for p in pending] == [
        ("r1", [WEBHOOK]), ("r2", [WEBHOOK])]
    assert len(failures) == 1 and "HTTP 500" in failures[0]
    assert services.issues[1]["state"] == "closed"  # GitHub took a's failure and resolution
    assert [i["title"] for i in services.issues.values()] == [
        issue_title("aaaaaaaaaaaa", "stage/kind: a"), issue_title("bbbbbbbbbbbb", "stage/kind: b")]


def test_every_kind_of_notification_reaches_both_channels(services):
    """Each kind posts to the webhook under its icon; each of a signature goes on its issue,
    and one of no signature (a quarantine proposal for a partition that never failed with one)
    on the webhook alone."""
    notifier = Notifier(Webhook(f"{services.url}/hook"),
                        GitHubIssues(REPO, GITHUB_TOKEN, f"{services.url}/api"))
    sent = [Notification(kind, "aaaaaaaaaaaa", f"{kind} title", "stage/kind: a", ["a|e1"],
                         run_id=f"r-{kind}") for kind in Kind if kind is not Kind.RESOLVED]
    sent.append(Notification(Kind.QUARANTINE, "", "quarantine proposed", "", ["b|e1"],
                             run_id="r-none"))
    pending, failures = deliver_in_order(notifier, [Pending(n, [WEBHOOK, GITHUB])
                                                    for n in sent])
    assert pending == [] and failures == []
    assert [h["text"].split(" mlci: ")[1] for h in services.hooks] == [n.title for n in sent]
    (number,) = services.issues
    assert len(services.comments[number]) == len(sent) - 2  # the first opened it; none for ""


def test_github_errors_name_the_call_and_never_the_token(services):
    issues = GitHubIssues(REPO, "wrong-token-123456", f"{services.url}/api")

    with pytest.raises(NotifyError) as error:
        issues.find_open_issue("aaaaaaaaaaaa")

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


RCA_KEY = "sk-rca-7f6e5d4c3b2a1908"
SECRET = "s3cret-value-9d8c7b6a"


def test_a_new_signature_gets_a_machine_generated_hypothesis_and_no_secret_is_sent(
    instance, dagster_home, tmp_path, notify_env, monkeypatch
):
    """The root-cause analyzer against the loopback OpenAI-compatible endpoint: it is given
    the signature, redacted log tails and what changed since the last pass; the hypothesis is
    stored and sent labelled machine-generated; no secret value ever reaches it."""
    services = notify_env
    monkeypatch.setenv("MLCI_RCA_URL", f"{services.url}/v1")
    monkeypatch.setenv("MLCI_RCA_MODEL", "triage-small")
    monkeypatch.setenv("MLCI_RCA_KEY", RCA_KEY)
    monkeypatch.setenv("MLCI_TEST_TOKEN", SECRET)
    monkeypatch.setenv("DB_PASSWORD", "pg-" + SECRET)  # declared nowhere: its name says it
    leaky = command_pipeline("fit", (
        "import os, sys; print('auth', os.environ['MLCI_TEST_TOKEN'], 'db', "
        "os.environ['DB_PASSWORD'], file=sys.stderr); sys.exit('loss diverged at step 7')"))
    registry = write_registry(tmp_path / "reg", [config("train", pipelines=[leaky])],
                              secrets=["MLCI_TEST_TOKEN"])
    driver = SensorDriver(instance, registry)
    driver.tick()

    run_partition(instance, registry, "train|e1")
    result = driver.tick()

    [request] = services.completions
    assert request.headers["Authorization"] == f"Bearer {RCA_KEY}"
    assert request.body["model"] == "triage-small"
    evidence = json.loads(request.body["messages"][-1]["content"])
    assert evidence["partitions"] == ["train|e1"]
    assert "loss diverged at step 7" in evidence["log_tails"]["train|e1"]
    assert "auth *** db ***" in evidence["log_tails"]["train|e1"]  # the tail, redacted
    assert evidence["changes"]["last_pass"] is None  # never passed
    sent = json.dumps(request.body)
    for secret in (SECRET, "pg-" + SECRET, RCA_KEY, GITHUB_TOKEN, WEBHOOK_TOKEN):
        assert secret not in sent
    answer = f"Likely cause of {evidence['signature']}"
    assert answer in json.dumps(services.hooks[-1])
    assert "root-cause hypothesis (machine-generated, unverified)" in json.dumps(
        services.hooks[-1])
    [observation] = result.asset_events
    [entry] = observation.metadata["entries"].value
    assert entry["hypothesis (machine-generated)"].startswith(answer)
    assert entry["analyzer"] == f"triage-small at {services.url}/v1"
    assert "machine-generated hypothesis" in observation.metadata["signatures"].value
