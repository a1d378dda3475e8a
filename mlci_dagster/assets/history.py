"""The history assets (every lifecycle result, and every test case the results kept, each
consolidated incrementally), their checks, and the HTML grid. The analysis itself is the
Dagster-free `mlci_dagster.history`."""

import time

import dagster as dg
import pandas as pd

from mlci_dagster.artifacts.publish import publish
from mlci_dagster.artifacts.store import StoreError
from mlci_dagster.compat import load_stored_value
from mlci_dagster.event_log import consolidate, consolidate_cases, latest_late_upload_id
from mlci_dagster.history.analysis import (
    PartitionSummary,
    analyze,
    coverage,
)
from mlci_dagster.history.case_analysis import TestSummary, analyze_cases
from mlci_dagster.history.grid import write_grid
from mlci_dagster.registry import Registry
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.searches import latest_searches
from mlci_dagster.vocabulary import partition_key

HISTORY = dg.AssetKey("history")
LATE_CURSOR = "late_uploads_cursor"  # the newest run_artifacts observation the table has read
TEST_HISTORY = dg.AssetKey("test_history")
TEST_CHECKS = {
    "no_test_regressions": "no test fails in every run since it last passed",
    "no_flaky_tests": "no test both passed and failed recently",
}
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


def summarize(instance: dg.DagsterInstance, registry: Registry, table: pd.DataFrame
              ) -> list[PartitionSummary]:
    partitions = [partition_key(c, e) for c, e in registry.partitions()]
    return analyze(table, partitions, registry.settings.history, time.time(),
                   latest_searches(instance).values())


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
             "builds": s.flakiness.mixed_builds, "flaky_cells": s.flakiness.flaky_cells,
             "runs": s.flakiness.runs, "signature": s.flakiness.signature,
             "signature_text": s.flakiness.signature_text}
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
    late = latest_late_upload_id(context.instance)  # read before: one after it reruns this
    table, added = consolidate(context.instance, load_previous(context))
    summaries = summarize(context.instance, mlci.registry(), table)
    context.log.info(f"history: {added} new results, {len(table)} in all")
    return dg.MaterializeResult(
        value=table,
        metadata={
            "rows": len(table), "new_rows": added,
            "cursor": int(table["storage_id"].max()) if len(table) else 0,
            LATE_CURSOR: late,
            "coverage": dg.MetadataValue.json(coverage(summaries)),
        },
        check_results=history_checks(summaries),
    )


def stored_cursor(instance: dg.DagsterInstance, key: dg.AssetKey, name: str = "cursor") -> int:
    """The storage id of the newest result an asset's stored table has read (0: none); with
    `name` LATE_CURSOR, of the newest late upload the history table has read."""
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return 0
    entry = event.asset_materialization.metadata.get(name)
    return int(entry.value) if entry is not None else 0


def test_checks(tests: list[TestSummary], window: int) -> list[dg.AssetCheckResult]:
    """Red for a test failing since it last passed (a regression), and for a flaky test (with
    its flips' rate over its last `window` runs, as a partition's transition rate)."""
    regressed = [{"partition": t.partition, "test": t.test_id, "failing_runs": t.failing_streak,
                  "last_pass": t.last_pass, "first_failure": t.first_failure}
                 for t in tests if t.regression]
    flaky = [{"partition": t.partition, "test": t.test_id, "flips": t.flips,
              "runs": min(t.runs, window), "signature": t.signature,
              "transition_rate": round(t.flips / max(1, min(t.runs, window) - 1), 3)}
             for t in tests if str(t.state) == "flaky"]
    return [dg.AssetCheckResult(
        check_name=name, passed=not found, metadata={
            "count": len(found), "tests": dg.MetadataValue.json(found[:100])},
        description=f"{len(found)} test(s) {what}" if found else TEST_CHECKS[name])
        for name, found, what in (("no_test_regressions", regressed, "regressed"),
                                  ("no_flaky_tests", flaky, "flaky"))]


@dg.asset(
    name="test_history", group_name="history", kinds={"pandas"}, deps=["results"],
    description="One row per test case per lifecycle result, from the test reports each "
                "pipeline declares.",
    required_resource_keys={"io_manager", "mlci"},
    check_specs=[dg.AssetCheckSpec(name, asset="test_history", description=text)
                 for name, text in TEST_CHECKS.items()],
)
def test_history(context: dg.AssetExecutionContext):
    mlci: MlciResource = context.resources.mlci
    after = stored_cursor(context.instance, TEST_HISTORY)
    previous = load_stored_value(context, TEST_HISTORY) if after else None
    table, added, newest = consolidate_cases(context.instance, previous, after)
    settings = mlci.registry().settings.history
    tests = analyze_cases(table, settings)
    context.log.info(f"test history: {added} new test results, {len(table)} in all")
    return dg.MaterializeResult(
        value=table,
        metadata={"rows": len(table), "new_rows": added, "cursor": newest,
                  "tests": len(tests),
                  "states": dg.MetadataValue.json(
                      pd.Series([str(t.state) for t in tests]).value_counts().to_dict()
                      if tests else {})},
        check_results=test_checks(tests, settings.flaky_window),
    )


@dg.asset(
    name="grid_report", group_name="history", kinds={"html"},
    description="The TestGrid-like HTML grid of every partition's recent runs.",
)
def grid_report(context: dg.AssetExecutionContext, mlci: MlciResource, history: pd.DataFrame,
                test_history: pd.DataFrame):
    registry = mlci.registry()
    summaries = summarize(context.instance, registry, history)
    path = write_grid(history, summaries, mlci.home_path() / "reports",
                      analyze_cases(test_history, registry.settings.history), test_history,
                      mlci.linking())
    counts = coverage(summaries)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "url": dg.MetadataValue.url(path.as_uri()),
        "summary": dg.MetadataValue.md(
            f"{counts['passing']} passing, {counts['failing']} failing, {counts['flaky']} flaky, "
            f"{counts['stale']} stale, {counts['untested']} untested of {counts['partitions']}"),
        "statuses": dg.MetadataValue.json({s.partition: str(s.status) for s in summaries}),
    })


@dg.asset(
    name="published_site", group_name="history", kinds={"html"},
    description="The grid, a page per partition and its tests, written to the artifact store "
                "under site/ after every history update (the nightly's among them): the URL a "
                "team bookmarks. `mlci publish` does the same by hand.",
)
def published_site(context: dg.AssetExecutionContext, mlci: MlciResource,
                   history: pd.DataFrame, test_history: pd.DataFrame):
    registry = mlci.registry()
    try:
        done = publish(mlci.artifact_store(), history, summarize(context.instance, registry,
                                                                 history),
                       analyze_cases(test_history, registry.settings.history), test_history,
                       mlci.linking(), time.time())
    except StoreError as exc:
        raise dg.Failure(f"the site was not published: {exc}") from None
    return dg.MaterializeResult(metadata={
        "url": dg.MetadataValue.url(done.url), "pages": done.pages, "bytes": done.size,
        "links_expire_h": done.expires_s / 3600 if done.expires_s is not None else None})
