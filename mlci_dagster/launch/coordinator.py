"""Dagster's queued run coordinator, with every lifecycle run tagged with its pool on submission,
and each pool's limit lowered by its daytime holds and its admissions in flight.

A pool depends on the partition (its config's `sandbox.pool`), so no static op pool can express
it, and runs of Dagster's implicit asset job (an asset backfill, a Materialize button) carry no
job tags: only the partition. Every launch path that goes through the queue (UI, GraphQL, job
and asset backfills, schedules, sensors) passes through `submit_run`, so tagging there puts the
`mlci/pool` tag on each run before the queue's tag concurrency limits count it.

A daytime hold keeps a slot of its reservation from morning to evening without a run in
progress, and an `mlci run` admitting a run takes a slot before its run is in progress: the
queue's limits, counting runs in progress, can see neither. The daemon asks this coordinator for
its run queue config at the start of every dequeue iteration, and gets each pool's limit less
its holds (the lease table) and its admissions in flight (launch/admission.py, where the
iteration is counted for them). Runs of a pool held whole wait in the queue.

`mlci sync` writes this class, and the limits into its config, into the instance's dagster.yaml
(see pools.py).
"""

from __future__ import annotations

import logging
from typing import Any

import dagster as dg

from mlci_dagster.compat import (
    HookedQueuedRunCoordinator,
    in_run_queue_daemon,
    instance_connection,
)
from mlci_dagster.launch.admission import AdmissionError, AdmissionStore
from mlci_dagster.launch.pools import lowered, pool_of
from mlci_dagster.paths import registry_path
from mlci_dagster.registry import RegistryError
from mlci_dagster.registry.loader import load_registry_cached
from mlci_dagster.reservations.leases import LeaseError, LeaseStore, holds_by_reservation
from mlci_dagster.vocabulary import (
    HELD_SANDBOX,
    HOLD_DOWN_JOB,
    HOLD_UP_JOB,
    PARTITION_TAG,
    POOL_TAG,
    RESULTS,
    STAGES,
    split_partition_key,
)

LIFECYCLE_KEYS = {dg.AssetKey(str(stage)) for stage in STAGES} | {dg.AssetKey(RESULTS)}


HELD_KEY = dg.AssetKey(HELD_SANDBOX)
log = logging.getLogger("mlci")


def hold_action(run: dg.DagsterRun) -> str:
    """`up` or `down`: what a run of the held_sandbox asset does (its op config)."""
    ops = (run.run_config or {}).get("ops", {})
    return ((ops.get(HELD_SANDBOX) or {}).get("config") or {}).get("action", "up")


def pool_of_run(run: dg.DagsterRun, registry_root: str) -> str | None:
    """The pool a lifecycle run counts against, or a hold's up (its reservation: a hold's down
    never waits, it frees a slot); None for a run that is neither (history, say), or whose
    partition's config the registry no longer has."""
    if POOL_TAG in run.tags or PARTITION_TAG not in run.tags:
        return run.tags.get(POOL_TAG)
    selection = set(run.asset_selection or ())
    if HELD_KEY in selection or run.job_name in (HOLD_UP_JOB, HOLD_DOWN_JOB):
        return run.tags[PARTITION_TAG] if hold_action(run) == "up" else None
    if run.job_name != "lifecycle" and not selection & LIFECYCLE_KEYS:
        return None
    try:
        config, _ = split_partition_key(run.tags[PARTITION_TAG])
        registry = load_registry_cached(registry_root)
    except (ValueError, RegistryError):
        return None
    return pool_of(registry, config) if config in registry.configs else None


class PoolTaggingRunCoordinator(HookedQueuedRunCoordinator):
    """QueuedRunCoordinator whose submitted lifecycle runs all carry their `mlci/pool` tag, and
    whose pool limits are lowered by holds and admissions in flight."""

    def tags_for(self, run: dg.DagsterRun) -> dict[str, str]:
        pool = pool_of_run(run, str(registry_path()))
        return {POOL_TAG: pool} if pool is not None else {}

    def lower_limits(self, instance: dg.DagsterInstance, limits: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        taken: dict[str, int] = {}
        try:
            admission = AdmissionStore(lambda: instance_connection(instance))
            if in_run_queue_daemon():
                admission.count_queue_iteration()
            taken = admission.claims()
        except AdmissionError as exc:
            log.warning(f"admissions unknown, pool limits not lowered by them: {exc}")
        try:
            holds = holds_by_reservation(LeaseStore(lambda: instance_connection(instance)))
        except LeaseError as exc:
            # Fails closed further on: a run admitted meanwhile finds no slot and is refused.
            log.warning(f"daytime holds unknown, reservation limits not lowered: {exc}")
            holds = {}
        for pool, count in holds.items():
            taken[pool] = taken.get(pool, 0) + count
        return lowered(limits, taken) if taken else limits
