"""What Dagster's sensor daemon does with a tick's run requests, for tests that have no daemon:
one run per request whose run key no run of the sensor has yet, tagged as the daemon tags it
(its run key and sensor name), executed here by `mlci run`'s workers side by side, each a real
Dagster run on the instance."""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg

from mlci_dagster.launch.runner import PartitionRun, RunEvents, run_partitions
from mlci_dagster.vocabulary import BATCH_TAG, TRIGGER_TAG

RUN_KEY_TAG, SENSOR_TAG = "dagster/run_key", "dagster/sensor_name"


def launch(instance: dg.DagsterInstance, registry: Path, home: Path, sensor: str,
           requests: list[dg.RunRequest], pool: str = "local") -> list[PartitionRun]:
    """Runs the requests not yet run (by run key), all at once; returns what ran."""
    items = [PartitionRun(str(r.partition_key), str(uuid.uuid4()), pool,
                          tags={**r.tags, RUN_KEY_TAG: str(r.run_key), SENSOR_TAG: sensor})
             for r in requests
             if not instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: str(r.run_key),
                                                          SENSOR_TAG: sensor}))]
    for first in items[:1]:
        run_partitions(instance, registry, items, {}, len(items), first.tags[TRIGGER_TAG], home,
                       RunEvents(), batch=first.tags.get(BATCH_TAG, ""),
                       max_wait_s=lambda _: 300.0)
    return items
