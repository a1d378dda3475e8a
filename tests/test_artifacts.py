"""The artifact store and a run's evidence in it: the local directory (the default) and an S3
bucket, served by moto's server mode (the closest real implementation of S3's wire protocol
here; boto3 talks to it as to AWS). Each artifact is stored whole or not at all, truncated with
a note past the limit; a store down never changes a run's verdict, and what it did not take is
named in the record; no secret reaches the store."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import pytest
import requests
import yaml

from mlci_dagster.artifacts.store import LocalStore, S3Store, StoreError, put
from mlci_dagster.cli import main
from mlci_dagster.common.aws import AwsSettings
from mlci_dagster.event_log import new_results
from mlci_dagster.providers.ports import allocate_free_port
from tests.support.registries import leaky_registry
from tests.support.runs import run_partition
from tests.test_commits import Sensor

TOKEN = "tok-5f1e2d3c4b5a"
UNDECLARED = "pw-9a8b7c6d5e"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_local_store_keeps_each_file_whole_and_truncates_past_the_limit(tmp_path):
    store = LocalStore(tmp_path / "store")
    small = tmp_path / "small.log"
    small.write_bytes(b"line\n" * 10)
    stored = put(store, "a/e1/run/log/small.log", small, 1000)
    target = tmp_path / "store" / "a/e1/run/log/small.log"
    assert target.read_bytes() == small.read_bytes()
    assert (stored.size, stored.sha256, stored.truncated) == (50, sha256(small.read_bytes()),
                                                              False)
    assert stored.url == target.as_uri()

    big = tmp_path / "big.log"
    big.write_bytes(b"x" * 5000)
    stored = put(store, "a/e1/run/log/big.log", big, 1000)
    body = (tmp_path / "store" / "a/e1/run/log/big.log").read_bytes()
    assert stored.truncated and len(body) == stored.size <= 1000
    assert body.startswith(b"xxx") and b"[mlci: truncated: the first 1,000 of 5,000 bytes" in body
    assert stored.sha256 == sha256(body)
    assert sorted(p.name for p in target.parent.iterdir()) == ["big.log", "small.log"]  # no tmp

    (tmp_path / "blocked").write_text("a file where a directory should be")
    with pytest.raises(StoreError, match="not written"):
        put(LocalStore(tmp_path / "blocked"), "k/small.log", small, 1000)
    with pytest.raises(StoreError, match="missing.log: not read"):
        put(store, "k/missing.log", tmp_path / "missing.log", 1000)




def test_the_s3_store_puts_objects_and_names_what_refuses_it(tmp_path, s3):
    url, client = s3
    source = tmp_path / "train.log"
    source.write_bytes(b"epoch 1 loss 0.3\n")
    store = S3Store("evidence", "mlci/", AwsSettings("us-east-1", url))
    stored = put(store, "a/e1/run/log/train.log", source, 1000)
    assert stored.url == "s3://evidence/mlci/a/e1/run/log/train.log"
    body = client.get_object(Bucket="evidence", Key="mlci/a/e1/run/log/train.log")["Body"].read()
    assert body == source.read_bytes() and stored.sha256 == sha256(body)

    with pytest.raises(StoreError, match="PutObject s3://nope/.*NoSuchBucket"):
        put(S3Store("nope", "", AwsSettings("us-east-1", url)), "k", source, 1000)
    closed = f"http://127.0.0.1:{allocate_free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError, match="PutObject"):
        put(S3Store("evidence", "", AwsSettings("us-east-1", closed)), "k", source, 1000)
    assert time.monotonic() - started < 30


def with_store(registry: Path, store: dict) -> None:
    settings = yaml.safe_load((registry / "mlci.yaml").read_text())
    settings["artifacts"] = store
    (registry / "mlci.yaml").write_text(yaml.safe_dump(settings))


def test_a_run_s_evidence_goes_to_s3_redacted_and_a_store_down_changes_nothing_else(
        instance, dagster_home, tmp_path, s3, monkeypatch, capsys):
    """The leaky config prints its secret token from its service and its failing pipeline:
    every uploaded object is read back and holds no token. Then with the store unreachable, the
    same run ends the same and names each piece it kept on the machine."""
    url, client = s3
    monkeypatch.setenv("MLCI_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("WAREHOUSE_PASSWORD", UNDECLARED)  # declared nowhere; its name says it
    registry = leaky_registry(tmp_path / "reg")
    config = yaml.safe_load((registry / "configs" / "leaky.yaml").read_text())
    config["pipelines"][0]["command"][-1] = (
        "import os, sys; print('auth', os.environ['API_TOKEN'], 'warehouse',"
        " os.environ['WAREHOUSE_PASSWORD'], file=sys.stderr); sys.exit(1)")
    (registry / "configs" / "leaky.yaml").write_text(yaml.safe_dump(config))
    with_store(registry, {"s3": {"bucket": "evidence", "prefix": "runs/", "endpoint_url": url}})
    _, first = run_partition(instance, registry, "leaky|e1")
    (record,) = [r for _, r in new_results(instance, 0)]
    assert record.status == first["status"] == "fail-pipeline_runs"
    assert record.artifacts_pending == []
    kinds = sorted(a.kind for a in record.artifacts.values())
    assert "bundle" in kinds and kinds.count("log") >= 2  # the pipeline's and the service's
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="evidence")["Contents"])
    assert keys == sorted(f"runs/{a.key}" for a in record.artifacts.values())
    for path, artifact in record.artifacts.items():
        assert artifact.key.startswith(f"leaky/e1/{record.run_id}/{artifact.kind}/")
        body = client.get_object(Bucket="evidence", Key=f"runs/{artifact.key}")["Body"].read()
        assert sha256(body) == artifact.sha256 and len(body) == artifact.size
        assert body == Path(path).read_bytes()  # as redacted on disk
        assert TOKEN.encode() not in body and UNDECLARED.encode() not in body
    # The pipeline's log was uploaded, with both printed, and masked.
    assert any(b"auth *** warehouse ***" in client.get_object(
        Bucket="evidence", Key=f"runs/{a.key}")["Body"].read()
        for a in record.artifacts.values() if a.kind == "log")

    with_store(registry, {"s3": {"bucket": "evidence",
                                 "endpoint_url": f"http://127.0.0.1:{allocate_free_port()}"}})
    time.sleep(2.5)  # a run reads the registry's files again after 2 s (RECHECK_S)
    down, second = run_partition(instance, registry, "leaky|e1")
    assert second["status"] == "fail-pipeline_runs" and second["artifacts"] == {}
    # Nothing of it is linked while it waits: the report names the paths on this machine.
    assert set(report_json(registry, capsys)["partitions"][0]["links"]) == {"run"}
    pending = second["artifacts_pending"]
    assert len(pending) == len(record.artifacts)
    assert all("PutObject" in p["why"] for p in pending)
    # One attempt at the store: the rest wait for it, not for a timeout each.
    assert sum("not tried, the store failed" in p["why"] for p in pending) == len(pending) - 1

    # The store back: the artifact_upload sensor uploads what waited, once; the run's record
    # and status are as they were.
    sensor = Sensor(instance, registry, "artifact_upload")
    assert sensor.tick().asset_events == []  # still down
    with_store(registry, {"s3": {"bucket": "evidence", "prefix": "runs/", "endpoint_url": url}})
    time.sleep(2.5)
    (event,) = sensor.tick().asset_events
    late = event.metadata["artifacts"].value
    assert event.metadata["run_id"].value == down.run_id and event.metadata["pending"].value == []
    assert sorted(late) == sorted(p["path"] for p in pending)
    for artifact in late.values():
        body = client.get_object(Bucket="evidence", Key=f"runs/{artifact['key']}")["Body"].read()
        assert sha256(body) == artifact["sha256"] and artifact["key"].startswith(
            f"leaky/e1/{down.run_id}/")
    assert sensor.tick().asset_events == []
    assert instance.get_run_by_id(down.run_id).status == dg.DagsterRunStatus.FAILURE
    (_, again), *_ = [(i, r) for i, r in new_results(instance, 0) if r.run_id == down.run_id]
    assert again.artifacts == {} and again.status == "fail-pipeline_runs"
    # The links appear where the run is shown: the report reads the late uploads.
    [shown] = report_json(registry, capsys)["partitions"]
    assert shown["last"]["run_id"] == down.run_id
    for name in ("log", "bundle"):
        fetched = requests.get(shown["links"][name], timeout=10)
        assert fetched.status_code == 200
        assert sha256(fetched.content) in {a["sha256"] for a in late.values()}


def report_json(registry: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["--registry", str(registry), "report", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_by_default_a_run_s_evidence_is_in_the_local_store(instance, dagster_home, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("MLCI_TEST_TOKEN", TOKEN)
    registry = leaky_registry(tmp_path / "reg")
    _, record = run_partition(instance, registry, "leaky|e1")
    assert record["artifacts_pending"] == [] and record["artifacts"]
    for artifact in record["artifacts"].values():
        stored = dagster_home / "mlci" / "artifacts" / artifact["key"]
        assert artifact["url"] == stored.as_uri()
        assert sha256(stored.read_bytes()) == artifact["sha256"]
