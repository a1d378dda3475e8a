"""Operations that every entry point shares (the CLI, the schedules, the sensors): each is one
function that does the work and returns what it found, which the CLI prints and a schedule or
sensor logs."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, partition_changes
from mlci_dagster.assets.reservations import record_guard
from mlci_dagster.registry import Registry
from mlci_dagster.reservations.guard import guard
from mlci_dagster.resources.mlci import MlciResource


def guard_batch(instance: dg.DagsterInstance, mlci: MlciResource,
                partitions: list[tuple[str, str]], log: Callable[[str], None],
                by: str = "pre-batch guard") -> dict[str, str]:
    """The pre-batch guard on every reservation the batch's partitions use, each pass recorded
    (its `reservation_clean` check): a daytime hold past its down time is torn down, dead
    holders' leases broken, what runs left on it reaped. Returns the reservations that stay
    held or dirty, with why: their partitions are not run in this batch."""
    rctx = mlci.reservations(instance)
    used = sorted({name for config, _ in partitions
                   if (name := rctx.registry.configs[config].config.sandbox.reservation)})
    refused = {}
    for name in used:
        report = guard(rctx, name, batch=True, by=by)
        for action in report.actions:
            log(f"reservation {name}: {action}")
        if not report.clean:
            refused[name] = report.reason
        record_guard(instance, rctx, report)
    return refused


def sync_partitions(instance: dg.DagsterInstance, registry: Registry
                    ) -> tuple[list[str], list[str]]:
    """Makes the config partitions equal the registry's configs: (added, removed). Another
    process may add the same partitions at the same moment (a second `mlci run`, the
    registry_sync sensor); Dagster's insert then fails on its unique key, and the changes are
    read and made once more."""
    try:
        return _apply_partition_changes(instance, registry)
    except Exception:  # noqa: BLE001 (SQLite's or PostgreSQL's IntegrityError)
        return _apply_partition_changes(instance, registry)


def _apply_partition_changes(instance: dg.DagsterInstance, registry: Registry
                             ) -> tuple[list[str], list[str]]:
    existing = set(instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
    add, remove = partition_changes(set(registry.configs), existing)
    if add:
        instance.add_dynamic_partitions(CONFIG_PARTITIONS.name, add)
    for name in remove:
        instance.delete_dynamic_partition(CONFIG_PARTITIONS.name, name)
    return add, remove
