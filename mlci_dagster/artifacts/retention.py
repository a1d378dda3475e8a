"""Retention of the artifact store: which objects are past their kind's `retention_days`, which
runs must keep their evidence whatever its age, and how much each kind takes. Pure functions
over what the store listed; listing and deleting are the caller's."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import get_args

import pandas as pd

from mlci_dagster.artifacts.store import StoredObject
from mlci_dagster.history.analysis import PartitionSummary
from mlci_dagster.registry.models import ArtifactKind
from mlci_dagster.registry.quarantine import QuarantineEntry
from mlci_dagster.vocabulary import judged, passed

DAY_S = 86_400
SITE = "site"  # the published static site, every key under `site/`
RUN_KINDS = frozenset(get_args(ArtifactKind)) - {SITE}  # under <config>/<engine>/<run id>/
OTHER = "other"  # usage of keys of no known shape (never deleted)


def kind_of(key: str) -> str | None:
    """The kind of a key: `site` under `site/`, else the 4th segment of
    `<config>/<engine>/<run id>/<kind>/<file>`; None for any other shape."""
    parts = key.split("/")
    if parts[0] == SITE and len(parts) > 1:
        return SITE
    if len(parts) == 5 and all(parts) and parts[3] in RUN_KINDS:
        return parts[3]
    return None


def run_of(key: str) -> str | None:
    """The run id of a run's evidence key; None for the site and keys of unknown shape."""
    return key.split("/")[2] if kind_of(key) in RUN_KINDS else None


def past_retention(found: StoredObject, retention_days: dict[str, float], now: float) -> bool:
    """Older than its kind's retention; a kind left out, or a key of unknown shape, never is."""
    days = retention_days.get(kind_of(found.key) or "")
    return days is not None and now - found.modified > days * DAY_S


def expired(objects: Iterable[StoredObject], retention_days: dict[str, float],
            keep_runs: Collection[str], now: float) -> list[StoredObject]:
    """The objects to delete: past their kind's retention, except the evidence of the runs in
    `keep_runs`."""
    return [o for o in objects
            if past_retention(o, retention_days, now) and run_of(o.key) not in keep_runs]


def referenced_runs(summaries: Iterable[PartitionSummary], quarantine: Iterable[QuarantineEntry],
                    table: pd.DataFrame, now: float) -> dict[str, str]:
    """Run id -> why its evidence is never deleted, whatever its age:
    - every partition failing now (its regression range is set: a failing streak of one or
      more, its alert open or not yet): the range's first failing and last passing run, and its
      latest failing run (whose log and bundle the report links). An alert still open while the
      partition passes again has no range, and protects nothing;
    - every partition with an ACTIVE quarantine entry (on the partition or one of its tests):
      each of its failing runs on record. An expired entry protects nothing.
    `table`: the history table (its partition, run_id and status columns)."""
    why: dict[str, str] = {}
    for summary in summaries:
        regression = summary.regression
        if not regression:
            continue
        for end, run in (("first failing", regression.get("first_fail")),
                         ("last passing", regression.get("last_pass")),
                         ("latest failing", summary.last)):
            if run and run.get("run_id"):
                why.setdefault(run["run_id"], f"the {end} run of {summary.partition}'s open "
                                              "regression")
    active = {e.partition: e for e in quarantine if e.active(now)}
    if active and not table.empty:
        rows = table[table["partition"].isin(list(active))]
        for partition, run_id, status in zip(rows["partition"], rows["run_id"], rows["status"],
                                             strict=True):
            if judged(status) and not passed(status):
                entry = active[partition]
                why.setdefault(run_id, f"a failing run of {entry.target}, quarantined until "
                                       f"{entry.expires}")
    return why


@dataclass
class KindUsage:
    bytes: int = 0
    objects: int = 0


def usage(objects: Iterable[StoredObject]) -> dict[str, KindUsage]:
    """Bytes and objects per kind, by kind name (`other`: keys of no known shape)."""
    found: dict[str, KindUsage] = {}
    for o in objects:
        used = found.setdefault(kind_of(o.key) or OTHER, KindUsage())
        used.bytes += o.size
        used.objects += 1
    return dict(sorted(found.items()))
