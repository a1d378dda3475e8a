"""The S3 IO manager of dagster-aws, against moto's S3 server on loopback (the real S3 REST
protocol over HTTP; no AWS account is reachable here)."""

from __future__ import annotations

import subprocess
import time

import boto3
import pytest
import requests

from mlci_dagster.definitions import HISTORY_JOB, build_definitions
from mlci_dagster.providers.ports import allocate_free_port
from tests.support.registries import PY, config, write_registry
from tests.support.runs import QUIET, run_partition

SECRET_KEY = "moto-secret-5e6f7a8b9c"


@pytest.fixture
def s3_server(monkeypatch):
    port = allocate_free_port()
    server = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                            "AWS_DEFAULT_REGION": "us-east-1", "MLCI_S3_BUCKET": "mlci-history",
                            "MLCI_S3_ENDPOINT_URL": url}.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket="mlci-history")
        yield s3
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_history_is_stored_in_s3_and_read_back_and_outcomes_are_not_pickled(
        s3_server, instance, dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config(
        "s3", sandbox={"services": []}, ui_smoke={"routes": []})], engines={"e1": {}})
    history_job = build_definitions(registry).resolve_job_def(HISTORY_JOB)

    rows = []
    for _ in range(2):
        run_partition(instance, registry, "s3|e1")
        result = history_job.execute_in_process(instance=instance, run_config=QUIET)
        [materialization] = result.asset_materializations_for_node("history")
        rows.append((materialization.metadata["rows"].value,
                     materialization.metadata["new_rows"].value))

    assert rows == [(1, 1), (2, 1)]  # the second run read the first table back from S3
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket="mlci-history")["Contents"]}
    assert "mlci/history" in keys
    # The lifecycle's outcomes live in the event log, never through the IO manager.
    assert not any(k.startswith(("mlci/results/", "mlci/sandbox/")) for k in keys), keys
    assert not (dagster_home / "storage" / "history").exists()
    leaks = [p for p in dagster_home.rglob("*")
             if p.is_file() and SECRET_KEY.encode() in p.read_bytes()]
    assert leaks == []
