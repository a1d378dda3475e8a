"""Dagster's queued run coordinator, with every lifecycle run tagged with its pool on submission.

A pool depends on the partition (its config's `sandbox.pool`), so no static op pool can express
it, and runs of Dagster's implicit asset job (an asset backfill, a Materialize button) carry no
job tags: only the partition. Every launch path that goes through the queue (UI, GraphQL, job
and asset backfills, schedules, sensors) passes through `submit_run`, so tagging there puts the
`mlci/pool` tag on each run before the queue's tag concurrency limits count it.

`mlci sync` writes this class into the instance's dagster.yaml (see pools.py).
"""

from __future__ import annotations

import dagster as dg

from mlci_dagster.paths import registry_path
from mlci_dagster.pools import POOL_TAG, pool_of
from mlci_dagster.registry import RegistryError
from mlci_dagster.registry.loader import load_registry_cached
from mlci_dagster.vocabulary import RESULTS, STAGES, split_partition_key

PARTITION_TAG = "dagster/partition"
LIFECYCLE_KEYS = {dg.AssetKey(str(stage)) for stage in STAGES} | {dg.AssetKey(RESULTS)}


def pool_of_run(run: dg.DagsterRun, registry_root: str) -> str | None:
    """The pool a lifecycle run counts against; None for a run that is not one (history, say),
    or whose partition's config the registry no longer has."""
    if POOL_TAG in run.tags or PARTITION_TAG not in run.tags:
        return run.tags.get(POOL_TAG)
    selection = set(run.asset_selection or ())
    if run.job_name != "lifecycle" and not selection & LIFECYCLE_KEYS:
        return None
    try:
        config, _ = split_partition_key(run.tags[PARTITION_TAG])
        registry = load_registry_cached(registry_root)
    except (ValueError, RegistryError):
        return None
    return pool_of(registry, config) if config in registry.configs else None


class PoolTaggingRunCoordinator(dg.QueuedRunCoordinator):
    """QueuedRunCoordinator whose submitted lifecycle runs all carry their `mlci/pool` tag."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        pool = pool_of_run(run, str(registry_path()))
        if pool is not None and run.tags.get(POOL_TAG) != pool:
            self._instance.add_run_tags(run.run_id, {POOL_TAG: pool})
            context = context._replace(dagster_run=run.with_tags({**run.tags, POOL_TAG: pool}))
        return super().submit_run(context)
