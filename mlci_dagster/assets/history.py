"""The history asset (every lifecycle result, consolidated incrementally), its checks, and the
HTML grid. The analysis itself is the Dagster-free `mlci_dagster.history`."""

import time
from pathlib import Path

import dagster as dg
import pandas as pd

from mlci_dagster.compat import load_stored_value
from mlci_dagster.event_log import consolidate
from mlci_dagster.history.analysis import (
    PartitionSummary,
    analyze,
    coverage,
)
from mlci_dagster.history.grid import write_grid
from mlci_dagster.paths import mlci_home
from mlci_dagster.registry import Registry
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.vocabulary import partition_key

HISTORY = dg.AssetKey("history")
CHECKS = {
    "no_new_regressions": "no partition has an open failure alert",
    "no_flaky_partitions": "no build both passed and failed recently",
    "no_confirmed_slowdowns": "no confirmed duration or metric slowdown",
    "no_stale_partitions": "every tested partition ran recently",
}


def load_previous(context: dg.AssetExecutionContext) -> pd.DataFrame | None:
    """The last stored table, read back through the same IO manager that stored it."""
    if context.instance.get_latest_materialization_event(HISTORY) is None:
        return None
    return load_stored_value(context, HISTORY)


def summarize(registry: Registry, table: pd.DataFrame) -> list[PartitionSummary]:
    partitions = [partition_key(c, e) for c, e in registry.partitions()]
    return analyze(table, partitions, registry.settings.history, time.time())


def _check(name: str, failing: list[dict], what: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name, passed=not failing,
        description=f"{len(failing)} partition(s) {what}" if failing else CHECKS[name],
        metadata={"count": len(failing), "partitions": dg.MetadataValue.json(failing)},
    )


def history_checks(summaries: list[PartitionSummary]) -> list[dg.AssetCheckResult]:
    """Red for an open regression, a flaky partition, a confirmed slowdown, a stale partition."""
    return [
        _check("no_new_regressions", [
            {"partition": s.partition, "failing_runs": s.failing_streak, **s.regression}
            for s in summaries if s.alert_open and s.regression], "regressed"),
        _check("no_flaky_partitions", [
            {"partition": s.partition, "transition_rate": s.flakiness.transition_rate,
             "builds": s.flakiness.mixed_builds}
            for s in summaries if s.flakiness.flaky], "flaky"),
        _check("no_confirmed_slowdowns", [
            {"partition": s.partition, **slow.__dict__}
            for s in summaries for slow in s.slowdowns], "slower"),
        _check("no_stale_partitions", [
            {"partition": s.partition, "last_run": s.last}
            for s in summaries if str(s.status) == "STALE"], "stale"),
    ]


@dg.asset(
    name="history", group_name="history", kinds={"pandas"}, deps=["results"],
    description="One row per lifecycle result of any partition, in the order recorded.",
    # The IO manager is asked for by key, to read back the previous table.
    required_resource_keys={"io_manager", "mlci"},
    check_specs=[dg.AssetCheckSpec(name, asset="history", description=text)
                 for name, text in CHECKS.items()],
)
def history(context: dg.AssetExecutionContext):
    mlci: MlciResource = context.resources.mlci
    table, added = consolidate(context.instance, load_previous(context))
    summaries = summarize(mlci.registry(), table)
    context.log.info(f"history: {added} new results, {len(table)} in all")
    return dg.MaterializeResult(
        value=table,
        metadata={
            "rows": len(table), "new_rows": added,
            "cursor": int(table["storage_id"].max()) if len(table) else 0,
            "coverage": dg.MetadataValue.json(coverage(summaries)),
        },
        check_results=history_checks(summaries),
    )


@dg.asset(
    name="grid_report", group_name="history", kinds={"html"},
    description="The TestGrid-like HTML grid of every partition's recent runs.",
)
def grid_report(context: dg.AssetExecutionContext, mlci: MlciResource, history: pd.DataFrame):
    summaries = summarize(mlci.registry(), history)
    path = write_grid(history, summaries, Path(mlci.home or mlci_home()) / "reports")
    counts = coverage(summaries)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "url": dg.MetadataValue.url(path.as_uri()),
        "summary": dg.MetadataValue.md(
            f"{counts['passing']} passing, {counts['failing']} failing, {counts['flaky']} flaky, "
            f"{counts['stale']} stale, {counts['untested']} untested of {counts['partitions']}"),
        "statuses": dg.MetadataValue.json({s.partition: str(s.status) for s in summaries}),
    })
