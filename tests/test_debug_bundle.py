"""A failed lifecycle keeps a redacted debug bundle of its sandbox, written before teardown."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import dagster as dg

from mlci_dagster.event_log import RESULTS_ASSET
from tests.support.registries import command_pipeline, config, leaky_registry, write_registry
from tests.support.runs import run_partition


def bundle_members(path: str | Path) -> dict[str, str]:
    """Member name (without the top directory) -> text."""
    with tarfile.open(path, "r:gz") as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode()
                for m in tar.getmembers() if m.isfile()}


def results_metadata(instance: dg.DagsterInstance, key: str) -> dict:
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, asset_partitions=[key]), limit=1
    ).records[0]
    return dict(record.asset_materialization.metadata)


def test_failing_pipeline_leaves_a_bundle_of_logs_probes_and_handle_linked_from_results(
    instance, dagster_home, tmp_path
):
    registry = write_registry(tmp_path / "reg", [config(
        "broken", pipelines=[command_pipeline(
            "train", "import sys; print('loss diverged', file=sys.stderr); sys.exit(3)")])])

    result, record = run_partition(instance, registry, "broken|e1")

    expected = dagster_home / "mlci" / "bundles" / result.run_id / "broken.e1.tar.gz"
    assert record["status"] == "fail-pipeline_runs"
    assert record["debug_bundle"] == str(expected)
    assert expected.is_file()
    link = results_metadata(instance, "broken|e1")["debug_bundle"]
    assert isinstance(link, dg.PathMetadataValue) and link.path == str(expected)
    members = bundle_members(expected)
    assert {"handle.json", "probes.json", "outcomes.json", "logs/service-web.log",
            "logs/pipeline-train.log"} <= set(members)
    assert "loss diverged" in members["logs/pipeline-train.log"]
    assert "GET / HTTP" in members["logs/service-web.log"]  # the readiness probe's request
    handle = json.loads(members["handle.json"])
    assert handle["sandbox_id"].startswith("broken.e1.") and "web" in handle["ports"]
    probes = json.loads(members["probes.json"])
    assert [(p["service"], p["ready"]) for p in probes] == [("web", True)]
    outcomes = json.loads(members["outcomes.json"])
    assert {s: o["status"] for s, o in outcomes.items()} == {
        "image": "pass", "sandbox": "pass", "pipeline_runs": "fail", "ui_smoke": "skip"}
    assert record["stages"]["teardown"]["status"] == "pass"  # and the sandbox is still gone
    assert not Path(handle["workdir"]).exists()


def test_planted_secret_never_reaches_the_debug_bundle(
    instance, dagster_home, tmp_path, monkeypatch
):
    secret = "tok-9f8e7d6c5b4a"
    monkeypatch.setenv("MLCI_TEST_TOKEN", secret)
    registry = leaky_registry(tmp_path / "reg")

    _, record = run_partition(instance, registry, "leaky|e1")

    members = bundle_members(record["debug_bundle"])
    assert "token is ***" in members["logs/service-web.log"]
    assert "auth ***" in members["logs/pipeline-train.log"]
    assert [name for name, text in members.items() if secret in text] == []
    with tarfile.open(record["debug_bundle"], "r:gz") as tar:
        assert all(secret not in m.name for m in tar.getmembers())


def test_passing_lifecycle_leaves_no_bundle(instance, dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("fine")])

    result, record = run_partition(instance, registry, "fine|e1")

    assert record["status"] == "pass"
    assert record["debug_bundle"] == ""
    assert not (dagster_home / "mlci" / "bundles").exists()
    assert results_metadata(instance, "fine|e1")["debug_bundle"].value == ""
