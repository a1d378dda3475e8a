"""The one module allowed to touch Dagster's internals or its testing helpers outside tests.

Each function names what it relies on; `tests/test_compat.py` pins each against the installed
Dagster (pyproject.toml pins the version), so an upgrade that moves one fails there first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg
from dagster._core.instance.types import CachingDynamicPartitionsLoader


def report_run_failed(instance: dg.DagsterInstance, run: dg.DagsterRun, message: str) -> None:
    """Marks a run whose worker died as failed (`DagsterInstance.report_run_failed`, not public):
    what Dagster's run monitoring does for launchers it can watch."""
    instance.report_run_failed(run, message=message)


def report_run_canceling(instance: dg.DagsterInstance, run: dg.DagsterRun, message: str
                         ) -> None:
    """Asks a run to stop (`DagsterInstance.report_run_canceling`, not public): what the UI's
    Terminate does first, so that the interrupt which follows ends the run CANCELED."""
    instance.report_run_canceling(run, message=message)


def check_evaluations_page(
    instance: dg.DagsterInstance, check: dg.AssetCheckKey, limit: int, cursor: int | None
) -> Sequence[Any]:
    """One page, newest first, of a check's executions (`event_log_storage`, not public)."""
    return instance.event_log_storage.get_asset_check_execution_history(
        check, limit=limit, cursor=cursor)


def load_stored_value(context: dg.AssetExecutionContext, asset_key: dg.AssetKey) -> Any:
    """An asset's last stored value, read back through the run's IO manager (an unpartitioned
    asset cannot depend on itself). The input context is built here rather than by
    `dg.build_input_context`, which gives it a console logger of its own at DEBUG: the IO
    manager's "Loading file from ..." line would reach stderr at every `mlci run`. With the
    run's own log manager it goes where the run's other messages go (the event log, and the
    console at the run's level); an error still raises."""
    return context.resources.io_manager.load_input(dg.InputContext(
        asset_key=asset_key, instance=context.instance, log_manager=context.log,
        upstream_output=dg.build_output_context(asset_key=asset_key),
    ))


class _KnownPartitions(CachingDynamicPartitionsLoader):
    """Answers Dagster's partition-existence checks from config keys read once per tick."""

    def __init__(self, instance: dg.DagsterInstance, keys: set[str]) -> None:
        super().__init__(instance)
        self.keys = keys

    def has_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> bool:
        return partition_key in self.keys


def resolve_run_requests(
    requests: list[dg.RunRequest], job: dg.JobDefinition, known: set[str],
    instance: dg.DagsterInstance,
) -> list[dg.RunRequest]:
    """Resolves the requests' partition tags against the config partitions read once.

    Left to Dagster, each distinct config costs a query of its own to check that its partition
    exists: 8,000 requests took tens of seconds on SQLite. (`RunRequest.
    with_resolved_tags_and_config` and `CachingDynamicPartitionsLoader` are not public.)
    """
    store = _KnownPartitions(instance, known)
    return [r.with_resolved_tags_and_config(target_definition=job, dynamic_partitions_requests=[],
                                            dynamic_partitions_store=store)
            for r in requests]


def cron_ticks(cron: str, start: float, end: float, timezone: str = "UTC") -> list[float]:
    """The times a schedule with this cron string fires in [start, end), as Dagster's scheduler
    computes them (`dagster._utils.schedules.cron_string_iterator`, not public)."""
    from dagster._utils.schedules import cron_string_iterator

    ticks = []
    for tick in cron_string_iterator(start, cron, timezone):
        if tick.timestamp() >= end:
            return ticks
        if tick.timestamp() >= start:
            ticks.append(tick.timestamp())
    return ticks


def partitions_of_unfinished_backfills(instance: dg.DagsterInstance) -> set[str]:
    """The partition keys that backfills still submitting (status REQUESTED: the UI's button,
    before the daemon has created all their runs) target, for any asset (`get_backfills`,
    `BulkActionsFilter`, and the backfill's `asset_backfill_data`, not public)."""
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    keys: set[str] = set()
    for backfill in instance.get_backfills(
            filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])):
        if backfill.asset_backfill_data is not None:
            keys.update(str(entry.partition_key) for entry in
                        backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
                        if entry.partition_key is not None)
        keys.update(backfill.partition_names or [])
    return keys


def instance_connection(instance: dg.DagsterInstance) -> Any:
    """A connection to the database of the instance's run storage, where the lease table lives
    beside Dagster's own (`SqlRunStorage.connect`, not public): SQLite under $DAGSTER_HOME on
    one machine, PostgreSQL when scaled out. Returns a context manager; on SQLite its
    statements commit together when it closes, on PostgreSQL each commits as it runs."""
    from dagster._core.storage.runs.sql_run_storage import SqlRunStorage

    storage = instance.run_storage
    if not isinstance(storage, SqlRunStorage):
        raise TypeError(f"the instance's run storage {type(storage).__name__} is not an SQL "
                        "database (expected SQLite or PostgreSQL storage in dagster.yaml)")
    return storage.connect()


def tag_limits(run_queue_config: Any) -> list[dict[str, Any]]:
    """The tag concurrency limits of the run queue config a QueuedRunCoordinator gives the
    daemon (`get_run_queue_config`, asked at every dequeue; `RunQueueConfig`, not public)."""
    return [dict(limit) for limit in run_queue_config.tag_concurrency_limits]


def with_tag_limits(run_queue_config: Any, limits: list[dict[str, Any]]) -> Any:
    """That config with other tag concurrency limits (a NamedTuple's `_replace`)."""
    return run_queue_config._replace(tag_concurrency_limits=limits)
