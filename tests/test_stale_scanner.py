"""The stale scanner: never-tested and stale partitions get runs; running ones never do."""

from __future__ import annotations

import time

import dagster as dg

from mlci_dagster.definitions import build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.sensors.stale_scanner import due_for_testing
from tests.support.registries import config, write_registry
from tests.support.runs import result_record

HOUR = 3600


def report_result(instance: dg.DagsterInstance, partition: str, finished_at: float) -> None:
    record = result_record(partition, "pass", finished_at - 60)
    instance.report_runless_asset_event(dg.AssetMaterialization(
        RESULTS_ASSET, partition=partition, metadata={"record": dg.MetadataValue.json(
            record.to_json())}))


def tick(instance: dg.DagsterInstance, registry, cursor: str | None = None):
    definitions = build_definitions(registry)
    scanner = definitions.resolve_sensor_def("stale_scanner")
    with dg.build_sensor_context(instance=instance, resources=definitions.resources,
                                 cursor=cursor) as context:
        return scanner(context), context.cursor


def test_due_for_testing_orders_never_tested_first_then_oldest():
    now = 100 * HOUR
    last = {"fresh|e": now - HOUR, "old|e": now - 30 * HOUR, "older|e": now - 50 * HOUR}
    partitions = ["fresh|e", "old|e", "older|e", "never|e", "running|e"]

    due = due_for_testing(partitions, last, {"running|e"}, now, stale_after_s=24 * HOUR)

    assert due == ["never|e", "older|e", "old|e"]


def test_scanner_requests_stale_and_untested_partitions_but_not_running_ones(instance, tmp_path):
    registry = write_registry(tmp_path / "reg", [config(n) for n in ("fresh", "old", "never",
                                                                     "busy")])
    instance.add_dynamic_partitions("config", ["fresh", "old", "never", "busy"])
    now = time.time()
    report_result(instance, "fresh|e1", now - HOUR)
    report_result(instance, "old|e1", now - 30 * HOUR)
    instance.add_run(dg.DagsterRun(job_name="lifecycle", status=dg.DagsterRunStatus.STARTED,
                                   tags={"dagster/partition": "busy|e1"}))

    first, cursor = tick(instance, registry)
    again, _ = tick(instance, registry, cursor=cursor)

    assert [str(r.partition_key) for r in first] == ["never|e1", "old|e1"]
    assert {r.tags["mlci/trigger"] for r in first} == {"sensor"}
    # The same state gives the same run keys: Dagster never launches them twice.
    assert [r.run_key for r in again] == [r.run_key for r in first]


def test_runs_of_any_job_and_unfinished_backfills_hold_the_scanner_off(instance, tmp_path):
    """A partition a UI backfill is about to launch (no run yet), or whose run another job
    started (the backfill's asset job), gets no second run from the scanner."""
    from dagster._core.execution.backfill import PartitionBackfill

    registry = write_registry(tmp_path / "reg", [config(n) for n in ("queued", "asset", "idle")])
    instance.add_dynamic_partitions("config", ["queued", "asset", "idle"])
    instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTING,
                                   tags={"dagster/partition": "asset|e1"}))
    graph = build_definitions(registry).resolve_asset_graph()
    instance.add_backfill(PartitionBackfill.from_asset_partitions(
        backfill_id="b1", asset_graph=graph, partition_names=["queued|e1"],
        asset_selection=[RESULTS_ASSET], backfill_timestamp=time.time(), tags={},
        dynamic_partitions_store=instance, all_partitions=False, title=None, description=None,
        run_config=None))

    requests, _ = tick(instance, registry)

    assert [str(r.partition_key) for r in requests] == ["idle|e1"]


def test_the_stale_scanner_is_off_and_only_nightly_and_event_sensors_start_lifecycle_runs(
        tmp_path):
    """What is on by default while the daemon runs (the README lists it): of it, only the
    nightly schedule, the image and commit event sensors and the culprit search start lifecycle
    runs. The stale
    scanner, which would run every never-tested partition of a freshly synced home within
    seconds, is off until turned on."""
    registry = write_registry(tmp_path / "reg", [config("a")])
    repository = build_definitions(registry).get_repository_def()
    running = dg.DefaultSensorStatus.RUNNING

    on = {s.name: [t.job_name for t in s.targets] if s.has_jobs else []
          for s in repository.sensor_defs if s.default_status == running}
    on |= {s.name: [s.job_name] for s in repository.schedule_defs
           if s.default_status == dg.DefaultScheduleStatus.RUNNING}

    assert repository.get_sensor_def("stale_scanner").default_status == \
        dg.DefaultSensorStatus.STOPPED
    assert "stale_scanner" not in on
    assert sorted(name for name, jobs in on.items() if "lifecycle" in jobs) == [
        "commit_poll", "culprit_search", "deflake_reruns", "image_poll", "image_push", "nightly",
        "pr_label"]
