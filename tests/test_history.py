"""History on a real Dagster instance: consolidation through the IO manager, checks, the grid."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlci_dagster.definitions import HISTORY_JOB, build_definitions
from tests.support.registries import PY, command_pipeline, config, write_registry
from tests.support.runs import QUIET, run_partition

BUILD = [PY, "-c", "import os, shutil; shutil.copy('platform/version.txt', "
                   "os.environ['MLCI_IMAGE_DIR'])"]
# The product under test: broken when its version file says so.
CHECK_PRODUCT = command_pipeline(
    "train", "import sys; v = open(sys.argv[1]).read(); print('version', v); "
    "sys.exit(1 if 'broken' in v else 0)")
CHECK_PRODUCT["command"].append("${image.path}/version.txt")


def update_history(instance: dg.DagsterInstance, registry: Path):
    """Materializes history and the grid; returns {check name: evaluation} and the metadata."""
    result = build_definitions(registry).resolve_job_def(HISTORY_JOB).execute_in_process(
        instance=instance, run_config=QUIET)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    [history] = result.asset_materializations_for_node("history")
    [grid] = result.asset_materializations_for_node("grid_report")
    return checks, history.metadata, grid.metadata


def test_regression_opens_with_both_digests_and_closes_after_a_pass(instance, tmp_path):
    registry = write_registry(
        tmp_path / "reg",
        [config("product", image={"build": {"command": BUILD, "inputs": ["platform/*"]}},
                pipelines=[CHECK_PRODUCT], sandbox={"services": []}, ui_smoke={"routes": []})],
        engines={"e1": {}})
    settings = (registry / "mlci.yaml").read_text()
    (registry / "mlci.yaml").write_text(
        settings + "history:\n  alert_open_after: 1\n  alert_close_after: 1\n")
    version = registry / "platform" / "version.txt"
    version.parent.mkdir()

    version.write_text("1.0")
    green = run_partition(instance, registry, "product|e1")[1]
    checks, meta, _ = update_history(instance, registry)
    assert green["status"] == "pass" and checks["no_new_regressions"].passed

    version.write_text("1.1 broken")  # a new image digest, the same config
    red = run_partition(instance, registry, "product|e1")[1]
    checks, meta, grid = update_history(instance, registry)
    regression = checks["no_new_regressions"]
    assert red["status"] == "fail-pipeline_runs"
    assert not regression.passed
    [found] = regression.metadata["partitions"].value
    assert found["partition"] == "product|e1"
    assert found["last_pass"]["image_digest"] == green["image_digest"]
    assert found["first_fail"]["image_digest"] == red["image_digest"] != green["image_digest"]
    assert found["verdict"] == "the product changed"
    assert (meta["rows"].value, meta["new_rows"].value) == (2, 1)  # appended, not rebuilt
    html = Path(grid["path"].value).read_text()
    assert "product" in html and "fail-pipeline_runs" in html

    version.write_text("1.2")
    run_partition(instance, registry, "product|e1")
    checks, meta, _ = update_history(instance, registry)
    assert checks["no_new_regressions"].passed  # closed after M = 1 pass
    assert (meta["rows"].value, meta["new_rows"].value) == (3, 1)


def test_flaky_partition_turns_its_check_red(instance, tmp_path, monkeypatch):
    # The same image and config, passing then failing: flaky, not a regression.
    flip = command_pipeline("coin", "import os, sys; sys.exit(int(os.environ['COIN']))")
    registry = write_registry(tmp_path / "reg", [config(
        "coin", pipelines=[flip], sandbox={"services": []}, ui_smoke={"routes": []})],
        engines={"e1": {}})
    for coin in ("0", "1", "0"):
        monkeypatch.setenv("COIN", coin)
        run_partition(instance, registry, "coin|e1")

    checks, meta, grid = update_history(instance, registry)

    assert not checks["no_flaky_partitions"].passed
    [flaky] = checks["no_flaky_partitions"].metadata["partitions"].value
    assert flaky["transition_rate"] == 1.0
    assert checks["no_new_regressions"].passed  # the default N = 2 failures not reached
    assert grid["statuses"].value == {"coin|e1": "FLAKY"}


def test_history_update_sensor_catches_up_on_results_recorded_while_it_was_off(instance,
                                                                             tmp_path):
    from mlci_dagster.event_log import RESULTS_ASSET, RUN_ARTIFACTS
    from tests.support.runs import result_record

    registry = write_registry(tmp_path / "reg", [config("a")])
    definitions = build_definitions(registry)
    sensor = definitions.resolve_sensor_def("history_update")

    def tick():
        with dg.build_sensor_context(instance=instance, resources=definitions.resources,
                                     repository_def=definitions.get_repository_def()) as context:
            return sensor.evaluate_tick(context)

    assert tick().skip_message == "no results recorded yet"
    # Two results land while no daemon (and so no sensor) runs.
    for started in (1000.0, 2000.0):
        instance.report_runless_asset_event(dg.AssetMaterialization(
            RESULTS_ASSET, partition="a|e1", metadata={"record": dg.MetadataValue.json(
                result_record("a|e1", "pass", started).to_json())}))
    newest = instance.fetch_materializations(RESULTS_ASSET, limit=1).records[0].storage_id

    [request] = tick().run_requests
    assert request.run_key == f"history:{newest}"
    _, metadata, _ = update_history(instance, registry)  # what the requested run does
    assert metadata["rows"].value == 2
    assert tick().skip_message == f"history is current (result {newest})"

    # A failure's evidence reaches the store late (the artifact_upload sensor's observation):
    # one more update, and the history row has the log's key, which the grid links.
    failed = result_record("a|e1", "fail-pipeline_runs", 3000.0).model_copy(
        update={"log_ref": "/runs/x/pipeline.log"})
    instance.report_runless_asset_event(dg.AssetMaterialization(
        RESULTS_ASSET, partition="a|e1", metadata={"record": dg.MetadataValue.json(
            failed.to_json())}))
    update_history(instance, registry)
    assert tick().skip_message.startswith("history is current")
    instance.report_runless_asset_event(dg.AssetObservation(RUN_ARTIFACTS, metadata={
        "run_id": failed.run_id, "partition": "a|e1", "artifacts": dg.MetadataValue.json(
            {"/runs/x/pipeline.log": {"kind": "log", "key": "a/e1/x/log/pipeline.log",
                                      "size": 3, "sha256": "0" * 64, "truncated": False,
                                      "url": "file:///store/a/e1/x/log/pipeline.log"}})}))
    late = instance.fetch_observations(RUN_ARTIFACTS, limit=1).records[0].storage_id
    [request] = tick().run_requests
    assert request.run_key.endswith(f":{late}")
    _, _, grid = update_history(instance, registry)
    assert tick().skip_message.startswith("history is current")
    page = Path(grid["path"].value).read_text()
    assert f'href="{(dagster_home_of(instance) / "mlci" / "artifacts").as_uri()}' \
           '/a/e1/x/log/pipeline.log">log</a>' in page


def dagster_home_of(instance: dg.DagsterInstance) -> Path:
    return Path(instance.root_directory)
