"""Retention of the artifact store: an object past its kind's `retention_days` is deleted unless
an open regression or an active quarantine points at its run; a kind left out, and a key of no
known shape, are kept for ever. The rules as pure functions; the operation on a real Dagster
instance with the local store (ages set by mtime) and on moto's S3 server (ages by a `now` in
the future); `mlci artifacts prune`, `mlci cost` and the daily sensor as they are called."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlci_dagster import cli
from mlci_dagster.artifacts.retention import expired, kind_of, run_of, usage
from mlci_dagster.artifacts.store import StoredObject
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.operations import prune_artifacts
from mlci_dagster.providers.ports import allocate_free_port
from mlci_dagster.registry.loader import _cache
from mlci_dagster.registry.quarantine import Quarantine, QuarantineEntry, save_quarantine
from mlci_dagster.resources.mlci import MlciResource
from tests.support.aws_proxy import FAKE_CREDENTIALS
from tests.support.registries import config, write_registry
from tests.support.runs import result_record
from tests.test_commits import Sensor

DAY = 86_400.0
NOW = 1_800_000_000.0


# --- the rules, pure -------------------------------------------------------------------------


def found(key: str, age_days: float, size: int = 10) -> StoredObject:
    return StoredObject(key, size, NOW - age_days * DAY)


@pytest.mark.parametrize(("key", "kind", "run"), [
    ("a/e1/run-1/log/train.log", "log", "run-1"),
    ("a/e1/run-1/bundle/debug.tar.gz", "bundle", "run-1"),
    ("a/e1/run-1/screenshot/home.png", "screenshot", "run-1"),
    ("a/e1/run-1/report/junit.xml", "report", "run-1"),
    ("site/index.html", "site", None),
    ("site/a/e1/run-1.html", "site", None),
    ("a/e1/run-1/logs/train.log", None, None),  # not a kind
    ("a/e1/run-1/log/sub/train.log", None, None),  # too deep
    ("a/e1/log/train.log", None, None),  # no run id
    ("notes.txt", None, None),
    ("site", None, None),
])
def test_a_key_names_its_kind_and_run_or_is_of_unknown_shape(key, kind, run):
    assert (kind_of(key), run_of(key)) == (kind, run)


def test_an_unreferenced_object_past_its_kind_s_retention_is_deleted():
    old = found("a/e1/run-1/log/train.log", 8)
    assert expired([old], {"log": 7}, set(), NOW) == [old]


def test_an_object_younger_than_its_kind_s_retention_is_kept():
    assert expired([found("a/e1/run-1/log/train.log", 6.9)], {"log": 7}, set(), NOW) == []


def test_a_kind_without_retention_is_kept_for_ever():
    old_log = found("a/e1/run-1/log/train.log", 400)
    old_report = found("a/e1/run-1/report/junit.xml", 400)
    assert expired([old_log, old_report], {"log": 30}, set(), NOW) == [old_log]


def test_a_key_of_unknown_shape_is_never_deleted():
    strays = [found(key, 400) for key in ("notes.txt", "a/e1/run-1/log/sub/x.log",
                                          "a/e1/run-1/other/x")]
    assert expired(strays, {"log": 1, "report": 1, "site": 1}, set(), NOW) == []


def test_the_site_has_its_own_retention():
    page, log = found("site/index.html", 40), found("a/e1/run-1/log/train.log", 40)
    assert expired([page, log], {"site": 30}, set(), NOW) == [page]
    assert expired([page, log], {"log": 30}, set(), NOW) == [log]


def test_the_evidence_of_a_run_kept_is_never_deleted():
    kept = [found("a/e1/run-1/log/train.log", 400), found("a/e1/run-1/bundle/b.tar.gz", 400)]
    other = found("a/e1/run-2/log/train.log", 400)
    assert expired([*kept, other], {"log": 1, "bundle": 1}, {"run-1"}, NOW) == [other]


def test_usage_counts_bytes_and_objects_per_kind():
    objects = [found("a/e1/r/log/a.log", 1, 100), found("a/e1/r/log/b.log", 1, 50),
               found("site/index.html", 1, 7), found("notes.txt", 1, 3)]
    assert {k: (u.bytes, u.objects) for k, u in usage(objects).items()} == {
        "log": (150, 2), "other": (3, 1), "site": (7, 1)}


# --- the operation on a real instance, with the local store ----------------------------------


def registry_with(root: Path, retention: dict[str, float], store: dict | None = None) -> Path:
    write_registry(root, [config("a"), config("b"), config("q")])
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    settings["artifacts"] = {"retention_days": retention, **(store or {})}
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings))
    _cache.clear()  # a registry read less than 2 s ago would stand in for the new file
    return root


def record(instance: dg.DagsterInstance, partition: str, run_id: str, status: str,
           started_at: float) -> None:
    """A results record materialized as the lifecycle materializes it."""
    result = result_record(partition, status, started_at).model_copy(update={"run_id": run_id})
    instance.report_runless_asset_event(dg.AssetMaterialization(
        RESULTS_ASSET, partition=partition,
        metadata={"record": dg.MetadataValue.json(result.to_json())}))


def body(key: str) -> str:
    return f"evidence of {key}\n"


def evidence(dagster_home: Path, keys: list[str], age_days: float) -> None:
    """Objects in the local store, last written `age_days` ago."""
    for key in keys:
        path = dagster_home / "mlci" / "artifacts" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body(key))
        then = time.time() - age_days * DAY
        os.utime(path, (then, then))


def stored(dagster_home: Path) -> list[str]:
    root = dagster_home / "mlci" / "artifacts"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def prune(instance, registry: Path, dry_run: bool = False, now: float | None = None):
    return prune_artifacts(instance, MlciResource(registry_path=str(registry)),
                           time.time() if now is None else now, dry_run)


def keys(objects) -> list[str]:
    return sorted(o.key if isinstance(o, StoredObject) else o[0].key for o in objects)


def test_the_local_store_loses_what_is_past_retention_and_its_emptied_folders(
        instance, dagster_home, tmp_path):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    record(instance, "a|e1", "run-1", "pass", time.time() - 10 * DAY)
    record(instance, "a|e1", "run-2", "pass", time.time() - DAY)
    evidence(dagster_home, ["a/e1/run-1/log/train.log", "a/e1/run-1/report/junit.xml"], 10)
    evidence(dagster_home, ["a/e1/run-2/log/train.log"], 1)

    done = prune(instance, registry)

    assert keys(done.deleted) == ["a/e1/run-1/log/train.log"] and done.kept == []
    assert done.freed_bytes == len(body("a/e1/run-1/log/train.log"))
    assert done.errors == []
    assert stored(dagster_home) == ["a/e1/run-1/report/junit.xml", "a/e1/run-2/log/train.log"]
    assert not (dagster_home / "mlci" / "artifacts" / "a/e1/run-1/log").exists()


def test_the_first_failing_last_passing_and_latest_runs_of_an_open_regression_are_kept(
        instance, dagster_home, tmp_path):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    start = time.time() - 30 * DAY
    for i, (run_id, status) in enumerate([("a-1", "pass"), ("a-2", "pass"),
                                          ("a-3", "fail-pipeline_runs"),
                                          ("a-4", "fail-pipeline_runs"),
                                          ("a-5", "fail-pipeline_runs")]):
        record(instance, "a|e1", run_id, status, start + i * DAY)
    # b failed and passed again: its regression is closed, nothing of it is referenced.
    record(instance, "b|e1", "b-1", "fail-pipeline_runs", start)
    record(instance, "b|e1", "b-2", "pass", start + DAY)
    runs = ["a-1", "a-2", "a-3", "a-4", "a-5", "b-1", "b-2"]
    evidence(dagster_home, [f"{r[0]}/e1/{r}/log/train.log" for r in runs], 20)

    done = prune(instance, registry)

    assert keys(done.deleted) == ["a/e1/a-1/log/train.log", "a/e1/a-4/log/train.log",
                                  "b/e1/b-1/log/train.log", "b/e1/b-2/log/train.log"]
    assert {o.key: why for o, why in done.kept} == {
        "a/e1/a-2/log/train.log": "the last passing run of a|e1's open regression",
        "a/e1/a-3/log/train.log": "the first failing run of a|e1's open regression",
        "a/e1/a-5/log/train.log": "the latest failing run of a|e1's open regression"}
    assert stored(dagster_home) == keys(done.kept)


@pytest.mark.parametrize(("expires_in_days", "kept"), [(10, True), (-1, False)])
def test_an_active_quarantine_keeps_its_partition_s_failing_runs_an_expired_one_nothing(
        instance, dagster_home, tmp_path, expires_in_days, kept):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    start = time.time() - 30 * DAY
    record(instance, "q|e1", "q-1", "fail-pipeline_runs", start)
    record(instance, "q|e1", "q-2", "pass", start + DAY)  # passing now: no regression
    expires = time.strftime("%Y-%m-%d", time.gmtime(time.time() + expires_in_days * DAY))
    save_quarantine(registry, Quarantine(quarantine=[QuarantineEntry(
        partition="q|e1", owner="ml-team", reason="flaky since the Ray upgrade",
        expires=expires)]))
    evidence(dagster_home, ["q/e1/q-1/log/train.log", "q/e1/q-2/log/train.log"], 20)

    done = prune(instance, registry)

    if kept:
        assert keys(done.deleted) == ["q/e1/q-2/log/train.log"]
        assert [(o.key, why) for o, why in done.kept] == [(
            "q/e1/q-1/log/train.log", f"a failing run of q|e1, quarantined until {expires}")]
    else:
        assert keys(done.deleted) == ["q/e1/q-1/log/train.log", "q/e1/q-2/log/train.log"]
        assert done.kept == []


def test_an_unreadable_quarantine_file_deletes_nothing_and_says_why(
        instance, dagster_home, tmp_path):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    (registry / "quarantine.yaml").write_text("quarantine: [{partition: nope}]\n")
    evidence(dagster_home, ["a/e1/run-1/log/train.log"], 20)

    done = prune(instance, registry)

    assert done.deleted == [] and stored(dagster_home) == ["a/e1/run-1/log/train.log"]
    [error] = done.errors
    assert error.startswith("nothing deleted: the quarantine file is unreadable") and \
        "quarantine.yaml" in error


def test_a_dry_run_deletes_nothing_and_says_what_it_would(instance, dagster_home, tmp_path):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    evidence(dagster_home, ["a/e1/run-1/log/train.log"], 20)

    done = prune(instance, registry, dry_run=True)

    assert keys(done.deleted) == ["a/e1/run-1/log/train.log"]
    assert stored(dagster_home) == ["a/e1/run-1/log/train.log"]


def test_bad_retention_kinds_and_days_name_the_field(tmp_path, capsys):
    registry = registry_with(tmp_path / "reg", {"logs": 7, "bundle": 0})

    assert cli.main(["--registry", str(registry), "validate"]) == 2

    err = capsys.readouterr().err
    assert "mlci.yaml: artifacts.retention_days.logs" in err
    assert "mlci.yaml: artifacts.retention_days.bundle" in err


# --- S3, on moto's server --------------------------------------------------------------------




def test_the_s3_store_is_listed_and_pruned_under_its_prefix(instance, dagster_home, tmp_path,
                                                            s3):
    url, client = s3
    registry = registry_with(tmp_path / "reg", {"log": 7, "site": 30}, {
        "s3": {"bucket": "evidence", "prefix": "runs/", "endpoint_url": url}})
    for key in ("runs/a/e1/run-1/log/train.log", "runs/a/e1/run-1/report/junit.xml",
                "runs/site/index.html", "elsewhere/a/e1/run-1/log/train.log"):
        client.put_object(Bucket="evidence", Key=key, Body=b"evidence\n")

    # Written now, judged 10 days from now: past the logs' retention, not the site's.
    done = prune(instance, registry, now=time.time() + 10 * DAY)

    assert done.where == "s3://evidence/runs/" and done.errors == []
    assert keys(done.deleted) == ["a/e1/run-1/log/train.log"]
    assert sorted(o["Key"] for o in client.list_objects_v2(Bucket="evidence")["Contents"]) == [
        "elsewhere/a/e1/run-1/log/train.log", "runs/a/e1/run-1/report/junit.xml",
        "runs/site/index.html"]
    later = prune(instance, registry, now=time.time() + 40 * DAY)
    assert keys(later.deleted) == ["site/index.html"]


def test_an_s3_store_down_is_an_error_said_not_raised(instance, dagster_home, tmp_path,
                                                       monkeypatch):
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    closed = f"http://127.0.0.1:{allocate_free_port()}"  # nothing listens there
    registry = registry_with(tmp_path / "reg", {"log": 7}, {
        "s3": {"bucket": "evidence", "endpoint_url": closed}})

    done = prune(instance, registry)

    assert done.deleted == [] and done.kept == []
    [error] = done.errors
    assert error.startswith("s3://evidence/mlci/: not listed: ListObjectsV2")


# --- the command line and the sensor ---------------------------------------------------------


def test_mlci_artifacts_prune_says_what_it_would_delete_then_deletes_it(
        instance, dagster_home, tmp_path, capsys):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    record(instance, "a|e1", "a-1", "pass", time.time() - 30 * DAY)
    record(instance, "a|e1", "a-2", "fail-pipeline_runs", time.time() - 29 * DAY)
    evidence(dagster_home, ["a/e1/a-1/log/train.log", "a/e1/a-2/log/train.log",
                            "a/e1/a-3/log/train.log"], 20)
    prune_args = ["--registry", str(registry), "artifacts", "prune"]

    assert cli.main([*prune_args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete:" in out and "a/e1/a-3/log/train.log" in out
    assert "kept, past retention but referenced:" in out
    assert "a/e1/a-2/log/train.log  20.0 days  the first failing run of a|e1's open " \
           "regression" in out
    freed = len(body("a/e1/a-3/log/train.log"))
    assert f"would delete 1 object(s), {freed} bytes; kept 2" in out and "dry run" in out
    assert len(stored(dagster_home)) == 3

    assert cli.main(prune_args) == 0
    out = capsys.readouterr().out
    assert "deleted:" in out and f"deleted 1 object(s), {freed} bytes; kept 2" in out
    assert stored(dagster_home) == ["a/e1/a-1/log/train.log", "a/e1/a-2/log/train.log"]


def test_mlci_cost_adds_the_store_s_size_per_kind_or_says_it_is_unreachable(
        instance, dagster_home, tmp_path, capsys, monkeypatch):
    registry = registry_with(tmp_path / "reg", {})
    evidence(dagster_home, ["a/e1/r/log/a.log", "a/e1/r/report/j.xml"], 1)

    assert cli.main(["--registry", str(registry), "cost"]) == 0
    out = capsys.readouterr().out
    root = dagster_home / "mlci" / "artifacts"
    log, report = len(body("a/e1/r/log/a.log")), len(body("a/e1/r/report/j.xml"))
    assert f"artifact store {root}: {log + report} bytes in 2 object(s)\n" \
           f"  log: {log} bytes in 1 object(s)\n  report: {report} bytes in 1 object(s)" in out
    assert cli.main(["--registry", str(registry), "cost", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["artifact_store"] == {
        "where": str(root), "error": None, "bytes": log + report, "objects": 2,
        "kinds": {"log": {"bytes": log, "objects": 1}, "report": {"bytes": report, "objects": 1}}}

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    registry_with(registry, {}, {"s3": {
        "bucket": "evidence", "endpoint_url": f"http://127.0.0.1:{allocate_free_port()}"}})
    assert cli.main(["--registry", str(registry), "cost"]) == 0
    out = capsys.readouterr().out
    assert "no partition bills anything" in out  # the rest is printed still
    assert "artifact store s3://evidence/mlci/: not listed: ListObjectsV2" in out


def test_the_sensor_prunes_once_a_day_and_a_store_down_never_fails_its_tick(
        instance, dagster_home, tmp_path, monkeypatch):
    registry = registry_with(tmp_path / "reg", {"log": 7})
    evidence(dagster_home, ["a/e1/run-1/log/train.log", "a/e1/run-2/log/train.log"], 20)
    sensor = Sensor(instance, registry, "artifact_retention")
    assert sensor.sensor.default_status is dg.DefaultSensorStatus.RUNNING

    first = sensor.tick()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert sensor.cursor == today and stored(dagster_home) == []
    assert first.skip_reason.skip_message.startswith(
        f"deleted 2 object(s) ({2 * len(body('a/e1/run-1/log/train.log'))} bytes) from "
        f"{dagster_home / 'mlci' / 'artifacts'}; kept 0")
    evidence(dagster_home, ["a/e1/run-3/log/train.log"], 20)
    assert sensor.tick().skip_reason.skip_message == f"pruned today already ({today} UTC)"
    assert stored(dagster_home) == ["a/e1/run-3/log/train.log"]

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    registry_with(registry, {"log": 7}, {"s3": {
        "bucket": "evidence", "endpoint_url": f"http://127.0.0.1:{allocate_free_port()}"}})
    sensor.cursor = "2000-01-01"
    down = sensor.tick()
    assert sensor.cursor == today
    assert "s3://evidence/mlci/: not listed: ListObjectsV2" in down.skip_reason.skip_message
