"""Operations that every entry point shares (the CLI, the schedules, the sensors): each is one
function that does the work and returns what it found, which the CLI prints and a schedule or
sensor logs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from mlci_dagster.artifacts.retention import expired, past_retention, referenced_runs, run_of
from mlci_dagster.artifacts.store import ArtifactStore, StoredObject
from mlci_dagster.assets.external import RELEASE_QUALIFICATION
from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, partition_changes
from mlci_dagster.assets.reservations import record_guard
from mlci_dagster.event_log import consolidate
from mlci_dagster.history.analysis import analyze
from mlci_dagster.launch.workers import end_lost_runs, run_over
from mlci_dagster.providers.janitor import Verdict, sweep
from mlci_dagster.registry import Registry
from mlci_dagster.registry.quarantine import quarantine_or_none
from mlci_dagster.reservations.context import ReservationContext
from mlci_dagster.reservations.guard import GuardReport, guard, tend
from mlci_dagster.reservations.leases import LeaseError
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.tiers.commits import sweep_checkouts


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
    add, remove = partition_changes(registry, existing)
    if add:
        instance.add_dynamic_partitions(CONFIG_PARTITIONS.name, add)
    for name in remove:
        instance.delete_dynamic_partition(CONFIG_PARTITIONS.name, name)
    return add, remove


@dataclass
class JanitorPass:
    """What one janitor pass did: the runs it found without their worker (marked failed), the
    reservations' guard passes that did or found something, why the reservations were not
    tended ("" when they were), and its verdict on every live sandbox."""

    reservations: ReservationContext
    lost_runs: list[str] = field(default_factory=list)
    tended: list[GuardReport] = field(default_factory=list)
    not_tended: str = ""
    verdicts: list[Verdict] = field(default_factory=list)
    checkouts: list[Path] = field(default_factory=list)  # commit trees of killed builds

    @property
    def reaped(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.reason]


def janitor_pass(instance: dg.DagsterInstance, mlci: MlciResource, dry_run: bool = False
                 ) -> JanitorPass:
    """The janitor, for the `sandbox_janitor` sensor and `mlci janitor` alike: ends the runs
    whose worker is gone, tends the reservations (holds past their down time taken down, dead
    holders' leases broken), then reaps every live sandbox whose run is over, lost or expired,
    and the commit trees that killed builds left.
    A dry run changes nothing and says what it would reap. The guard passes are returned, for
    the caller to record: a sensor in its result, `mlci` on the instance (record_guards)."""
    done = JanitorPass(mlci.reservations(instance))
    if not dry_run:
        done.lost_runs = end_lost_runs(instance)
        try:
            done.tended = [r for r in tend(done.reservations) if r.actions or r.problems]
        except LeaseError as exc:
            done.not_tended = str(exc)
    done.verdicts = sweep(mlci.providers(), run_over(instance),
                          teardown_timeout=mlci.teardown_timeout(), dry_run=dry_run,
                          keep=done.reservations.keep_held())
    if not dry_run:
        done.checkouts = sweep_checkouts(mlci.home_path())
    return done


def record_guards(instance: dg.DagsterInstance, done: JanitorPass) -> None:
    """Records a janitor pass's guard passes outside a run, as the nightly's are."""
    for report in done.tended:
        record_guard(instance, done.reservations, report)


def qualified_releases(instance: dg.DagsterInstance, limit: int = 100) -> list[dict]:
    """The qualified SHAs, newest first: sha, tier, partitions, when."""
    found = []
    for record in instance.fetch_observations(RELEASE_QUALIFICATION, limit=limit).records:
        event = record.asset_observation
        if event is None:
            continue
        meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
        found.append({"sha": meta.get("sha"), "tier": meta.get("tier"),
                      "partitions": meta.get("partitions"), "qualified_at": record.timestamp})
    return found


@dataclass
class StoreListing:
    """What the artifact store holds, listed whole: where it is, its objects, and why it could
    not be listed ("" when it was)."""

    where: str
    objects: list[StoredObject] = field(default_factory=list)
    error: str = ""


def list_artifact_store(store: ArtifactStore) -> StoreListing:
    """Every object of the artifact store; a store down or refusing is said, not raised."""
    where = store.location()
    try:
        return StoreListing(where, list(store.objects()))
    except Exception as exc:  # noqa: BLE001 (StoreError, boto3's client setup, an OSError)
        return StoreListing(where, error=f"{where}: not listed: {exc}")


@dataclass
class ArtifactPrune:
    """One pass of the artifact store's retention: what it deleted (or, a dry run, would),
    what was past retention but kept because an open regression or an active quarantine
    points at its run (with why), and what went wrong (deleting stops at the first error)."""

    where: str
    dry_run: bool
    retention_days: dict[str, float]
    deleted: list[StoredObject] = field(default_factory=list)
    kept: list[tuple[StoredObject, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(o.size for o in self.deleted)


DELETE_BATCH = 1000  # keys per delete call: what is reported deleted is what was


def prune_artifacts(instance: dg.DagsterInstance, mlci: MlciResource, now: float,
                    dry_run: bool = False) -> ArtifactPrune:
    """The retention of the artifact store, for the `artifact_retention` sensor and `mlci
    artifacts prune` alike: deletes the objects older than their kind's `retention_days`
    except the evidence of referenced runs (retention.referenced_runs, read from the whole
    history and the registry's quarantine). An unreadable quarantine file deletes nothing: which
    runs it protects cannot be told."""
    registry = mlci.registry()
    retention = dict(registry.settings.artifacts.retention_days)
    store = mlci.artifact_store()
    done = ArtifactPrune(store.location(), dry_run, retention)
    if not retention:
        return done
    listing = list_artifact_store(store)
    if listing.error:
        done.errors.append(listing.error)
        return done
    old = [o for o in listing.objects if past_retention(o, retention, now)]
    if not old:
        return done
    quarantine, unreadable = quarantine_or_none(registry.root)
    if unreadable:
        done.errors.append(f"nothing deleted: the quarantine file is unreadable, and may protect "
                           f"some runs: {unreadable.splitlines()[0]}")
        return done
    table, _ = consolidate(instance, None)
    summaries = analyze(table, registry.partition_keys(), registry.settings.history, now)
    referenced = referenced_runs(summaries, quarantine.quarantine, table, now)
    doomed = expired(old, retention, referenced, now)
    done.kept = [(o, referenced[run]) for o in old if (run := run_of(o.key)) in referenced]
    if dry_run:
        done.deleted = doomed
        return done
    for start in range(0, len(doomed), DELETE_BATCH):
        batch = doomed[start:start + DELETE_BATCH]
        try:
            store.delete([o.key for o in batch])
        except Exception as exc:  # noqa: BLE001 (StoreError, boto3's client setup)
            done.errors.append(f"{listing.where}: {len(doomed) - start} object(s) not deleted: "
                               f"{exc}")
            break
        done.deleted += batch
    return done
