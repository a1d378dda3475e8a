"""The month's spend as the Dagster instance knows it: the costs the results records carry, and
the estimates of lifecycle runs still in progress. The arithmetic is `cost.py`'s."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

import dagster as dg

from mlci_dagster.compat import cron_ticks
from mlci_dagster.cost import (
    MonthSpend,
    PartitionProjection,
    estimate_run,
    hourly_rate,
    month_end,
    month_start,
    project_partition,
)
from mlci_dagster.event_log import PAGE, RESULTS_ASSET, read_record
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.launch.workers import IN_PROGRESS
from mlci_dagster.registry import Registry
from mlci_dagster.vocabulary import PARTITION_TAG, partition_key, split_partition_key

# Recorded costs looked back on: this month, and the last one for a median at a month's start.
LOOKBACK_S = 31 * 86_400
MEDIAN_OF = 20  # a partition's latest recorded costs that its estimate is the median of


def results_since(instance: dg.DagsterInstance, since: float) -> Iterator[ResultRecord]:
    """Every valid results record stored after `since` (a timestamp), oldest first."""
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, after_timestamp=since),
            limit=PAGE, cursor=cursor, ascending=True)
        for record in page.records:
            materialization = record.asset_materialization
            found = read_record(record.storage_id, materialization.metadata) \
                if materialization is not None else None
            if found is not None:
                yield found
        if not page.has_more:
            return
        cursor = page.cursor


class RecordedCosts:
    """Per partition, the costs of its runs that held a sandbox, oldest first: those since
    `month` (a timestamp) and the latest few over the look-back."""

    def __init__(self, records: Iterator[ResultRecord], month: float) -> None:
        self.month: dict[str, list[float]] = collections.defaultdict(list)
        self.recent: dict[str, list[float]] = collections.defaultdict(list)
        for record in records:
            if record.cost_usd is None or record.skipped:
                continue
            self.recent[record.partition].append(record.cost_usd)
            if record.finished_at >= month:
                self.month[record.partition].append(record.cost_usd)

    @classmethod
    def read(cls, instance: dg.DagsterInstance, now: float) -> RecordedCosts:
        month = month_start(now)
        return cls(results_since(instance, month - LOOKBACK_S), month)

    def past(self, partition: str) -> tuple[float, ...]:
        return tuple(self.recent.get(partition, [])[-MEDIAN_OF:])

    def month_total(self) -> float:
        return sum(sum(costs) for costs in self.month.values())


def in_progress_estimate(instance: dg.DagsterInstance, registry: Registry,
                         costs: RecordedCosts, except_run: str) -> tuple[float, int]:
    """(USD, runs): what the lifecycle runs in progress other than `except_run` are expected to
    cost, each at its partition's estimate."""
    total, count = 0.0, 0
    for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS)):
        if run.run_id == except_run or PARTITION_TAG not in run.tags:
            continue
        try:
            config, engine = split_partition_key(run.tags[PARTITION_TAG])
        except ValueError:
            continue
        if config not in registry.configs:
            continue
        rate = hourly_rate(registry.configs[config].config, registry.settings.costs)
        if rate:
            partition = partition_key(config, engine)
            total += estimate_run(registry.configs[config].config, rate,
                                  costs.past(partition)).usd
            count += 1
    return total, count


def month_spend(instance: dg.DagsterInstance, registry: Registry, run_id: str,
                now: float | None = None) -> tuple[MonthSpend, RecordedCosts]:
    """The month's spend as seen by the run `run_id` (not counting itself), and the costs read."""
    costs = RecordedCosts.read(instance, time.time() if now is None else now)
    running_usd, running = in_progress_estimate(instance, registry, costs, run_id)
    return MonthSpend(costs.month_total(), running_usd, running), costs


def project_month(instance: dg.DagsterInstance, registry: Registry, cron: str, tier: str,
                  now: float | None = None, timezone: str = "UTC"
                  ) -> list[PartitionProjection]:
    """Every billed partition's month: spent so far, and its estimate times the schedule's
    ticks left this month (for the partitions of the scheduled tier)."""
    now = time.time() if now is None else now
    costs = RecordedCosts.read(instance, now)
    ticks_left = len(cron_ticks(cron, now, month_end(now), timezone))
    scheduled = set(registry.partitions(tier=tier))
    projections = []
    for config, engine in registry.partitions():
        loaded = registry.configs[config]
        rate = hourly_rate(loaded.config, registry.settings.costs)
        if not rate:
            continue  # bills nothing (local, kubernetes), or no rate is known
        partition = partition_key(config, engine)
        projections.append(project_partition(
            partition, loaded.config, rate, costs.month.get(partition, []),
            costs.past(partition), ticks_left if (config, engine) in scheduled else None))
    return projections
