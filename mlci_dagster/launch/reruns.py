"""The deflake rerun a failed run is due, as both launch paths ask it: the deflake_reruns sensor
(for the runs the daemon launched) and `mlci run`'s runner (for its own runs). The rule of which
failure is due one, and what it is, is culprits/reruns.py's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import dagster as dg

from mlci_dagster.culprits.reruns import rerun_key, rerun_tags
from mlci_dagster.event_log import record_of_run
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.registry import Registry
from mlci_dagster.vocabulary import ATTEMPT_TAG, RERUN_OF_TAG


@dataclass(frozen=True)
class Rerun:
    """The next attempt of a failed run's cell: the partition, its run key and its tags."""

    partition: str
    run_key: str
    tags: dict[str, str]
    attempt: int


def due_rerun(instance: dg.DagsterInstance, registry: Registry, record: ResultRecord,
              tags: Mapping[str, str]) -> Rerun | None:
    """The rerun `record` (of a run with `tags`) awaits; None when it awaits none, when its
    config has left the registry, or when a run of that attempt exists already (whoever
    launched it)."""
    if not record.awaiting_rerun or record.config not in registry.configs:
        return None
    attempt = record.attempt + 1
    if instance.get_runs(dg.RunsFilter(tags={RERUN_OF_TAG: record.cell,
                                             ATTEMPT_TAG: str(attempt)}), limit=1):
        return None
    image_ref = registry.configs[record.config].config.image.ref
    return Rerun(record.partition, rerun_key(record), rerun_tags(record, tags, image_ref),
                 attempt)


def rerun_of_run(instance: dg.DagsterInstance, registry: Registry, run_id: str
                 ) -> Rerun | None:
    """The rerun the finished run `run_id` is due, from its results record."""
    record, run = record_of_run(instance, run_id), instance.get_run_by_id(run_id)
    return due_rerun(instance, registry, record, run.tags if run is not None else {}) \
        if record is not None else None
