"""Pins each use of Dagster internals in `mlci_dagster.compat` against the installed Dagster: an
upgrade that moves or changes one fails here, by name."""

from __future__ import annotations

import dagster as dg

from mlci_dagster import compat
from mlci_dagster.assets.partitions import multi_partition_key
from mlci_dagster.definitions import HISTORY_JOB, LIFECYCLE_JOB, build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from tests.support.registries import config, write_registry
from tests.support.runs import QUIET, result_record


def test_report_run_failed_marks_a_started_run_failed(instance):
    run = instance.add_run(dg.DagsterRun(job_name="lifecycle",
                                         status=dg.DagsterRunStatus.STARTED))

    compat.report_run_failed(instance, run, "worker gone")

    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    [failure] = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert "worker gone" in failure.message


def test_report_run_canceling_asks_a_started_run_to_stop(instance):
    run = instance.add_run(dg.DagsterRun(job_name="lifecycle",
                                         status=dg.DagsterRunStatus.STARTED))

    compat.report_run_canceling(instance, run, "interrupted by mlci run")

    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELING
    [event] = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_CANCELING)
    assert "interrupted by mlci run" in event.message


def test_history_reads_back_its_table_and_check_evaluations_are_paged(instance, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("a")])
    instance.report_runless_asset_event(dg.AssetMaterialization(
        RESULTS_ASSET, partition="a|e1", metadata={"record": dg.MetadataValue.json(
            result_record("a|e1", "pass", 1000.0).to_json())}))
    job = build_definitions(registry).resolve_job_def(HISTORY_JOB)

    job.execute_in_process(instance=instance, run_config=QUIET)
    second = job.execute_in_process(instance=instance, run_config=QUIET)

    [history] = second.asset_materializations_for_node("history")
    # load_stored_value read the first table back: one row, none new.
    assert (history.metadata["rows"].value, history.metadata["new_rows"].value) == (1, 0)
    # Through the run's own log manager: the IO manager's line is in the history step's log
    # (not on a console logger of its own, which printed it to stderr).
    history_step = [e.user_message for e in instance.all_logs(second.run_id)
                    if e.step_key == "history"]
    assert any(m.startswith("Loading file from") for m in history_step), history_step
    check = dg.AssetCheckKey(dg.AssetKey("history"), "no_new_regressions")
    page = compat.check_evaluations_page(instance, check, limit=10, cursor=None)
    assert len(page) == 2 and page[0].id > page[1].id  # newest first
    assert page[0].event.dagster_event.event_specific_data.passed


def test_run_requests_resolve_partition_and_pool_tags_from_known_keys(instance, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("a")])
    job = build_definitions(registry).get_repository_def().get_job(LIFECYCLE_JOB)
    request = dg.RunRequest(partition_key=multi_partition_key("a", "e1"), run_key="k")

    [resolved] = compat.resolve_run_requests([request], job, {"a"}, instance)

    assert resolved.tags["dagster/partition"] == "a|e1"
    assert resolved.tags["mlci/pool"] == "local"


def test_no_other_module_touches_dagster_internals():
    from pathlib import Path

    package = Path(compat.__file__).parent
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "compat.py" and ("dagster._" in p.read_text())]
    assert offenders == []


def test_cron_ticks_are_the_schedule_s_fire_times_within_the_window():
    import datetime as dt

    start = dt.datetime(2026, 2, 1, tzinfo=dt.UTC).timestamp()
    end = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()
    ticks = compat.cron_ticks("0 2 * * *", start, end)
    assert len(ticks) == 28  # every night of February 2026
    assert ticks[0] == start + 2 * 3600 and all(start <= t < end for t in ticks)
    assert compat.cron_ticks("0 2 * * *", end - 3600, end) == []


def test_no_module_of_the_package_or_the_benchmarks_imports_dagster_internals():
    """`dagster._` anywhere but compat.py, in mlci_dagster/ and benchmarks/."""
    from pathlib import Path

    root = Path(compat.__file__).parent.parent
    offenders = [str(p.relative_to(root)) for folder in ("mlci_dagster", "benchmarks")
                 for p in (root / folder).rglob("*.py")
                 if p.name != "compat.py" and "dagster._" in p.read_text()]
    assert offenders == []


def test_partitions_of_unfinished_backfills_reads_asset_and_job_backfills(instance, tmp_path):
    """`DagsterInstance.get_backfills` with `BulkActionsFilter(statuses=[REQUESTED])`, and a
    backfill's `asset_backfill_data.target_subset` or `partition_names`."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

    registry = write_registry(tmp_path / "reg", [config("a"), config("b")])
    definitions = build_definitions(registry)
    instance.add_dynamic_partitions("config", ["a", "b"])
    asset_backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="assets", asset_graph=definitions.get_repository_def().asset_graph,
        partition_names=["a|e1"], asset_selection=[RESULTS_ASSET], backfill_timestamp=1.0,
        tags={}, dynamic_partitions_store=instance, all_partitions=False, title=None,
        description=None, run_config=None)
    job_backfill = PartitionBackfill(backfill_id="job", status=BulkActionStatus.REQUESTED,
                                     from_failure=False, tags={}, backfill_timestamp=2.0,
                                     partition_names=["b|e1"])
    done = PartitionBackfill(backfill_id="done", status=BulkActionStatus.COMPLETED,
                             from_failure=False, tags={}, backfill_timestamp=3.0,
                             partition_names=["a|e2"])
    for backfill in (asset_backfill, job_backfill, done):
        instance.add_backfill(backfill)

    assert compat.partitions_of_unfinished_backfills(instance) == {"a|e1", "b|e1"}
    instance.update_backfill(job_backfill.with_status(BulkActionStatus.COMPLETED))
    assert compat.partitions_of_unfinished_backfills(instance) == {"a|e1"}


def test_instance_connection_reaches_the_run_storages_database(instance):
    """`SqlRunStorage.connect`: the lease and admission tables live beside Dagster's runs."""
    import sqlalchemy as sa

    with compat.instance_connection(instance) as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert {"runs", "run_tags"} <= tables


def test_the_caching_partitions_loader_answers_from_the_instance(instance):
    """`CachingDynamicPartitionsLoader`, as the daemon's code server reads partitions."""
    instance.add_dynamic_partitions("config", ["a"])
    loader = compat.caching_partitions_loader(instance)
    assert loader.has_dynamic_partition("config", "a")
    assert not loader.has_dynamic_partition("config", "zz")


def test_in_run_queue_daemon_is_the_daemons_dequeue_thread_alone():
    """`dagster._daemon.controller` names each daemon's thread `dagster-daemon-<type>`, and
    QueuedRunCoordinatorDaemon.daemon_type() is the type the name is built from (a real daemon
    counts its iterations in test_pools.py)."""
    import threading

    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
        QueuedRunCoordinatorDaemon,
    )

    assert f"dagster-daemon-{QueuedRunCoordinatorDaemon.daemon_type()}" == \
        compat.RUN_QUEUE_DAEMON_THREAD
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(compat.in_run_queue_daemon()),
                              name=compat.RUN_QUEUE_DAEMON_THREAD)
    thread.start()
    thread.join()
    assert seen == [True] and not compat.in_run_queue_daemon()


class _Lowering(compat.HookedQueuedRunCoordinator):
    def lower_limits(self, instance, limits):
        return [{**limit, "limit": limit["limit"] - 1} for limit in limits]


def test_the_hooked_coordinator_lowers_the_queues_limits(tmp_path, monkeypatch):
    """`QueuedRunCoordinator.get_run_queue_config` (its `tag_concurrency_limits`, `_instance`),
    as `DagsterInstance.get_concurrency_config` reads it for the daemon. Its `submit_run` hook
    (`SubmitRunContext._replace`) wants a run from a code location: the UI's launches through a
    real webserver pin it (test_launch_paths.py, every run tagged with its pool)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry: {enabled: false}\n"
        "run_coordinator:\n  module: tests.test_compat\n  class: _Lowering\n"
        "  config:\n    tag_concurrency_limits: [{key: mlci/pool, value: gpu, limit: 3}]\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_coordinator, _Lowering)
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert [dict(limit) for limit in limits] == [{"key": "mlci/pool", "value": "gpu", "limit": 2}]
