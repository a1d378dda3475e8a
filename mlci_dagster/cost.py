"""What a run costs, what a month will cost, and whether the budget allows the next run.

A run's cost is the resource-seconds its sandbox held (from the sandbox stage's start to the
end of teardown) times the hourly rates under `costs:` in mlci.yaml. The budget is checked
before anything is created, against the month's recorded costs plus an estimate of every run
still in progress and of this one. All of it is pure: the Dagster layer reads the records.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlci_dagster.registry.models import BudgetSettings, CostSettings, TestConfig
from mlci_dagster.vocabulary import Stage

HOUR_S = 3600.0
# The stages during which a sandbox may exist: the worst case of a run never recorded before.
BILLED_STAGES = (Stage.SANDBOX, Stage.PIPELINE_RUNS, Stage.UI_SMOKE, Stage.TEARDOWN)


def hourly_rate(config: TestConfig, costs: CostSettings) -> float | None:
    """USD per hour the config's sandbox costs while it exists; 0.0 when it bills nothing,
    None when a resource it bills has no rate (the registry refuses that once rates are set)."""
    total = 0.0
    for resource in config.sandbox.billed_resources():
        rate = costs.hourly_usd.get(resource.type)
        if rate is None:
            return None
        total += rate * resource.count * (costs.spot_multiplier if resource.spot else 1.0)
    return total


def run_cost(rate: float | None, billed_s: float) -> float | None:
    return None if rate is None else round(rate * billed_s / HOUR_S, 6)


def worst_case_s(config: TestConfig) -> float:
    """The longest a sandbox of this config may exist: its stages' timeouts end to end."""
    return sum(config.timeouts.for_stage(stage) for stage in BILLED_STAGES)


@dataclass(frozen=True)
class RunEstimate:
    usd: float
    basis: str  # what the estimate rests on, for the refusal and `mlci cost`


def estimate_run(config: TestConfig, rate: float, past_costs: Sequence[float]) -> RunEstimate:
    """The median of the partition's recorded costs, or, never recorded, its worst case."""
    if past_costs:
        return RunEstimate(statistics.median(past_costs),
                           f"median of {len(past_costs)} recorded run(s)")
    return RunEstimate(rate * worst_case_s(config) / HOUR_S,
                       f"worst case: {worst_case_s(config):g}s of stage timeouts at "
                       f"${rate:g}/h")


def month_start(now: float) -> float:
    """The start of `now`'s calendar month, UTC (budgets are monthly, in UTC)."""
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_end(now: float) -> float:
    start = dt.datetime.fromtimestamp(month_start(now), dt.UTC)
    return (start + dt.timedelta(days=32)).replace(day=1).timestamp()


@dataclass(frozen=True)
class MonthSpend:
    """What the month has cost so far, and what runs in progress are expected to add."""

    recorded_usd: float
    in_progress_usd: float
    in_progress_runs: int

    @property
    def total_usd(self) -> float:
        return self.recorded_usd + self.in_progress_usd


def budget_refusal(budget: BudgetSettings | None, spend: MonthSpend, estimate: RunEstimate
                   ) -> str | None:
    """Why the run may not start (its month would exceed the budget), or None."""
    if budget is None or estimate.usd <= 0:
        return None
    if spend.total_usd + estimate.usd <= budget.monthly_usd:
        return None
    running = (f" + ${spend.in_progress_usd:.4f} for {spend.in_progress_runs} run(s) in "
               "progress" if spend.in_progress_runs else "")
    return (f"budget: this run (${estimate.usd:.4f}, {estimate.basis}) would take the month to "
            f"${spend.total_usd + estimate.usd:.4f}, over budget.monthly_usd "
            f"${budget.monthly_usd:g} (recorded this month: ${spend.recorded_usd:.4f}{running});"
            " refused before anything was created")


@dataclass(frozen=True)
class PartitionProjection:
    """One partition's month: what its runs cost so far and what the rest of the month adds."""

    partition: str
    rate_usd_h: float
    runs: int
    spent_usd: float
    per_run: RunEstimate
    runs_left: int | None  # the schedule's ticks left this month; None: not on the schedule

    @property
    def projected_usd(self) -> float:
        return self.spent_usd + self.per_run.usd * (self.runs_left or 0)

    @property
    def upper_bound(self) -> bool:
        """Projected from its stage timeouts (never recorded): what it may cost at most."""
        return bool(self.runs_left) and not self.runs


def project_partition(partition: str, config: TestConfig, rate: float,
                      month_costs: Iterable[float], past_costs: Sequence[float],
                      runs_left: int | None) -> PartitionProjection:
    spent = list(month_costs)
    return PartitionProjection(partition, rate, len(spent), sum(spent),
                               estimate_run(config, rate, past_costs), runs_left)
