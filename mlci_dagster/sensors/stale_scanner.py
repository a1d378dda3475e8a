"""Requests runs for partitions never tested or whose last result is older than the registry's
`history.stale_after_h` (default 24 h), never for a partition with a run in progress or in a
backfill still launching its runs.

Off until turned on (Automation → Sensors in the UI, or `dagster sensor start stale_scanner`):
on a freshly synced home every partition is untested, and a UI just opened must launch nothing
until the nightly schedule, an image or commit event, or a person does."""

import json
import time

import dagster as dg

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, multi_partition_key
from mlci_dagster.compat import partitions_of_unfinished_backfills
from mlci_dagster.event_log import new_results
from mlci_dagster.launch.workers import UNFINISHED
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.vocabulary import PARTITION_TAG, TRIGGER_TAG, partition_key, split_partition_key

MAX_RUNS_PER_TICK = 50


def due_for_testing(
    partitions: list[str], last_finished: dict[str, float], in_progress: set[str],
    now: float, stale_after_s: float,
) -> list[str]:
    """Never tested first, then the oldest; none that is running or recent."""
    due = [p for p in partitions if p not in in_progress
           and now - last_finished.get(p, float("-inf")) > stale_after_s]
    return sorted(due, key=lambda p: last_finished.get(p, float("-inf")))


def stale_scanner(job: dg.JobDefinition) -> dg.SensorDefinition:
    @dg.sensor(name="stale_scanner", job=job, minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Runs partitions never tested, or not tested within stale_after_h. "
                           "Off until turned on.")
    def scanner(context: dg.SensorEvaluationContext, mlci: MlciResource):
        cursor = json.loads(context.cursor) if context.cursor else {"after": 0, "last": {}}
        for storage_id, record in new_results(context.instance, cursor["after"]):
            cursor["after"] = storage_id
            cursor["last"][record.partition] = record.finished_at
        registry = mlci.registry()
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        partitions = [partition_key(c, e) for c, e in registry.partitions() if c in known]
        # Whatever launched them (this job, a UI backfill's asset job, `mlci run`), and what a
        # backfill still submitting will launch.
        running = context.instance.get_runs(dg.RunsFilter(statuses=UNFINISHED))
        in_progress = {r.tags.get(PARTITION_TAG, "") for r in running}
        in_progress |= partitions_of_unfinished_backfills(context.instance)
        due = due_for_testing(partitions, cursor["last"], in_progress, time.time(),
                              registry.settings.history.stale_after_h * 3600)
        requests = [
            dg.RunRequest(
                partition_key=multi_partition_key(*split_partition_key(p)),
                # One request per partition per result: a retried tick never doubles it.
                run_key=f"stale:{p}:{cursor['last'].get(p, 'never')}",
                tags={TRIGGER_TAG: "sensor"},
            )
            for p in due[:MAX_RUNS_PER_TICK]
        ]
        context.update_cursor(json.dumps(cursor))
        if not requests:
            return dg.SkipReason(f"{len(partitions)} partitions, none stale or untested")
        return requests

    return scanner
