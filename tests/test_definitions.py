"""The whole Definitions loads, and the schedule and sensor do what they say."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from mlci_dagster.assets.partitions import multi_partition_key
from mlci_dagster.definitions import HISTORY_JOB, LIFECYCLE_JOB, build_definitions, defs
from mlci_dagster.paths import LOCAL_EXAMPLE
from tests.support.registries import config, write_registry

STAGES = ["image", "sandbox", "pipeline_runs", "ui_smoke", "teardown", "results"]


def test_definitions_load_with_assets_checks_job_schedule_and_sensor():
    repo = defs.get_repository_def()
    repo.get_all_jobs()  # what a code server does on load: op and job names must not clash

    assert sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()) == sorted(
        [*STAGES, "history", "test_history", "grid_report", "published_site",
         "sandbox_janitor", "registry",
         "pushed_image", "pull_request_label", "commit_summary", "release_qualification",
         "failure_signatures", "culprit_search", "run_artifacts"])
    checks = {(c.asset_key.to_user_string(), c.name) for c in repo.asset_graph.asset_check_keys}
    assert checks == {(s, "stage_passed") for s in STAGES[:-1]} | {
        ("results", "lifecycle_passed"), ("history", "no_new_regressions"),
        ("history", "no_flaky_partitions"), ("history", "no_confirmed_slowdowns"),
        ("history", "no_stale_partitions"), ("registry", "registry_valid"),
        ("test_history", "no_test_regressions"), ("test_history", "no_flaky_tests")}
    assert repo.has_job(LIFECYCLE_JOB) and repo.has_job(HISTORY_JOB) and \
        repo.has_job("find_culprit")
    assert [s.name for s in repo.schedule_defs] == ["nightly"]
    assert sorted(s.name for s in repo.sensor_defs) == [
        "artifact_retention", "artifact_upload", "commit_poll", "commit_status", "culprit_search",
        "deflake_reruns", "history_update", "image_poll", "image_push", "notify", "pr_label",
        "registry_sync", "sandbox_janitor", "stale_scanner", "teardown_after_cancel",
        "teardown_after_failure"]
    partitions = repo.asset_graph.get(dg.AssetKey("results")).partitions_def
    assert isinstance(partitions, dg.MultiPartitionsDefinition)
    assert [d.name for d in partitions.partitions_defs] == ["config", "engine"]


def test_a_registry_with_reservations_adds_their_assets_checks_jobs_and_schedules():
    from mlci_dagster.paths import EXAMPLES

    repo = build_definitions(EXAMPLES / "reservations").get_repository_def()
    repo.get_all_jobs()

    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"reservation/gpu-box", "held_sandbox"} <= keys
    assert ("reservation/gpu-box", "reservation_clean") in {
        (c.asset_key.to_user_string(), c.name) for c in repo.asset_graph.asset_check_keys}
    held = repo.asset_graph.get(dg.AssetKey("held_sandbox")).partitions_def
    assert held.get_partition_keys() == ["gpu-box"]
    assert repo.has_job("hold_up") and repo.has_job("hold_down")
    assert sorted(s.name for s in repo.schedule_defs) == [
        "hold_down_gpu_box", "hold_up_gpu_box", "nightly"]


def test_nightly_schedule_requests_every_nightly_partition_with_its_trigger(instance, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("a"), config("b", tiers=["pr"])],
                              engines={"e1": {}, "e2": {}})
    instance.add_dynamic_partitions("config", ["a", "b"])
    definitions = build_definitions(registry)
    nightly = definitions.resolve_schedule_def("nightly")

    tick = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    with dg.build_schedule_context(instance=instance, resources=definitions.resources,
                                   repository_def=definitions.get_repository_def(),
                                   scheduled_execution_time=tick) as context:
        requests = nightly.evaluate_tick(context).run_requests

    assert sorted(r.partition_key for r in requests) == ["a|e1", "a|e2"]
    assert {r.tags["mlci/trigger"] for r in requests} == {"schedule"}
    assert {r.run_key for r in requests} == {"nightly:2026-11-24:a|e1", "nightly:2026-11-24:a|e2"}
    assert {r.tags["mlci/batch"] for r in requests} == {"nightly 2026-11-24"}  # a grid column


def test_registry_sync_sensor_adds_new_and_removes_deleted_configs(instance, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("a"), config("b")])
    instance.add_dynamic_partitions("config", ["a", "gone"])
    definitions = build_definitions(registry)
    sensor = definitions.resolve_sensor_def("registry_sync")

    with dg.build_sensor_context(instance=instance, resources=definitions.resources) as context:
        result = sensor(context)

    added = [r for r in result.dynamic_partitions_requests
             if isinstance(r, dg.AddDynamicPartitionsRequest)]
    deleted = [r for r in result.dynamic_partitions_requests
               if isinstance(r, dg.DeleteDynamicPartitionsRequest)]
    assert [list(r.partition_keys) for r in added] == [["b"]]
    assert [list(r.partition_keys) for r in deleted] == [["gone"]]


def test_partition_key_string_form_is_config_bar_engine():
    assert str(multi_partition_key("python-train", "sqlite")) == "python-train|sqlite"


def test_example_registry_is_the_default():
    assert build_definitions(LOCAL_EXAMPLE).get_repository_def().has_job(LIFECYCLE_JOB)
