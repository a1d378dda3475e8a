"""The one module allowed to touch Dagster's internals or its testing helpers outside tests.

Each function names what it relies on; `tests/test_compat.py` pins each against the installed
Dagster (pyproject.toml pins the version), so an upgrade that moves one fails there first.
"""

from __future__ import annotations

import threading
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


def caching_partitions_loader(instance: dg.DagsterInstance) -> Any:
    """What the daemon's code server reads dynamic partitions through: each read once per tick
    (`dagster._core.instance.types.CachingDynamicPartitionsLoader`, not public)."""
    return CachingDynamicPartitionsLoader(instance)


RUN_QUEUE_DAEMON_THREAD = "dagster-daemon-QUEUED_RUN_COORDINATOR"


def in_run_queue_daemon() -> bool:
    """Whether this is the daemon's run queue thread, which asks the run coordinator for its
    run queue config at the start of each dequeue iteration (the webserver and the event log
    storage ask too). `dagster._daemon.controller` names each daemon's thread
    `dagster-daemon-<daemon_type>`; QueuedRunCoordinatorDaemon's type is
    QUEUED_RUN_COORDINATOR."""
    return threading.current_thread().name == RUN_QUEUE_DAEMON_THREAD


class HookedQueuedRunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's queued run coordinator with two hooks for a subclass to fill:
    `tags_for(run)`, tags added to a run as it is submitted (before the queue's tag limits count
    it), and `lower_limits(instance, limits)`, the queue's tag concurrency limits as the daemon
    reads them at the start of each dequeue iteration.

    Relies on (not public): `submit_run`'s `SubmitRunContext`, a NamedTuple (`_replace`); the
    coordinator's `_instance`; `get_run_queue_config`, which the daemon asks at each dequeue
    iteration, and its `RunQueueConfig.tag_concurrency_limits`, a NamedTuple field."""

    def tags_for(self, run: dg.DagsterRun) -> dict[str, str]:
        return {}

    def lower_limits(self, instance: dg.DagsterInstance, limits: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        return limits

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        missing = {k: v for k, v in self.tags_for(run).items() if run.tags.get(k) != v}
        if missing:
            self._instance.add_run_tags(run.run_id, missing)
            context = context._replace(dagster_run=run.with_tags({**run.tags, **missing}))
        return super().submit_run(context)

    def get_run_queue_config(self) -> Any:
        config = super().get_run_queue_config()
        limits = [dict(limit) for limit in config.tag_concurrency_limits]
        lowered = self.lower_limits(self._instance, limits)
        return config if lowered == limits else config._replace(tag_concurrency_limits=lowered)
