"""Pure analysis of the history table, per (config, engine), never mixing partitions.

Statuses follow TestGrid's model; alerts open after N consecutive failures and close after M
passes; regressions are ranged by the last passing and first failing run; flakes are the same
build both passing and failing; slowdowns compare the latest runs against a trailing median
and MAD. Runs that failed for infrastructure, or in a large enough batch where (nearly) the
whole matrix failed, are outages: they are neither flakes nor regressions.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlci_dagster.history.table import DURATION_PREFIX, series_columns
from mlci_dagster.registry.models import HistorySettings
from mlci_dagster.vocabulary import (
    LIFECYCLE_SKIP,
    FailureKind,
    judged,
    out_of_line,
    passed,
    split_partition_key,
)

DAY_S = 86_400
MAD_TO_SIGMA = 1.4826  # scales the MAD to a standard deviation for normal data
RUN_FIELDS = ["run_id", "status", "failed_stage", "failure_kind", "image_digest", "config_id",
              "code_version", "finished_at", "duration_s", "trigger", "cost_usd", "signature",
              "signature_text", "batch", "log_ref", "debug_bundle", "sha", "attempt", "rerun_of",
              "log_key", "bundle_key"]


class PartitionStatus(enum.StrEnum):
    PASS = "PASS"
    FLAKY = "FLAKY"
    FAILING = "FAILING"
    BROKEN = "BROKEN"  # the latest run was an outage: it says nothing about the product
    STALE = "STALE"
    PENDING = "PENDING"  # never tested


@dataclass
class Slowdown:
    series: str  # e.g. duration:pipeline:train or metric:rmse:lower
    baseline_median: float
    baseline_mad: float
    samples: int
    latest: list[float]
    magnitude: float  # relative change in the bad direction: 0.5 = 50% worse


@dataclass
class Flakiness:
    flaky: bool = False
    transition_rate: float = 0.0
    mixed_builds: list[dict[str, str]] = field(default_factory=list)  # digest + config id
    # Cells that failed and then passed on a deflake rerun: each its attempts' run ids.
    flaky_cells: list[list[str]] = field(default_factory=list)
    runs: int = 0  # the runs in the window
    signature: str = ""  # the latest failure's in the window, and its text
    signature_text: str = ""


@dataclass
class PartitionSummary:
    partition: str
    config: str
    engine: str
    status: PartitionStatus
    runs: int = 0
    last: dict[str, Any] | None = None
    failing_streak: int = 0
    alert_open: bool = False
    regression: dict[str, Any] | None = None
    flakiness: Flakiness = field(default_factory=Flakiness)
    slowdowns: list[Slowdown] = field(default_factory=list)
    cost_usd: float | None = None  # every recorded run's cost; None when none had one
    refused_since_last_run: int = 0  # runs refused (skip: the budget) after the latest run
    # The latest run, when it is a failure awaiting its deflake rerun: no verdict yet, so the
    # status and the rules stand on the runs before it.
    rerunning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = str(self.status)
        return data


# --- rules: small pure functions over one partition's chronological results ------------------


def alert_open(passes: list[bool], open_after: int, close_after: int) -> bool:
    """Opens after `open_after` consecutive failures; closes after `close_after` passes."""
    is_open, fail_streak, pass_streak = False, 0, 0
    for ok in passes:
        fail_streak, pass_streak = (0, pass_streak + 1) if ok else (fail_streak + 1, 0)
        if not is_open and fail_streak >= open_after:
            is_open = True
        elif is_open and pass_streak >= close_after:
            is_open = False
    return is_open


def failing_streak(passes: list[bool]) -> int:
    streak = 0
    for ok in reversed(passes):
        if ok:
            break
        streak += 1
    return streak


def regression_range(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """For a partition failing now: the last passing and first failing run, and what changed."""
    streak = failing_streak([passed(r["status"]) for r in runs])
    if streak == 0:
        return None
    first_fail = runs[-streak]
    last_pass = runs[-streak - 1] if streak < len(runs) else None
    if last_pass is None:
        return {"last_pass": None, "first_fail": _run(first_fail), "changed": [],
                "verdict": "no passing run on record"}
    changed = [name for name, key in (("product", "image_digest"), ("test", "config_id"),
                                      ("harness", "code_version"))
               if last_pass.get(key) != first_fail.get(key)]
    verdict = {
        (): "nothing changed: likely a flake or an outside cause",
        ("product",): "the product changed",
        ("test",): "the test changed",
        ("harness",): "the harness changed",
    }.get(tuple(changed), " and ".join(changed) + " changed")
    return {"last_pass": _run(last_pass), "first_fail": _run(first_fail), "changed": changed,
            "verdict": verdict}


def flakiness(runs: list[dict[str, Any]], window: int) -> Flakiness:
    """Flaky when one build (image digest and config id) both passed and failed in the window,
    or a cell failed and then passed on its deflake rerun."""
    recent = runs[-window:]
    outcomes: dict[tuple[str, str], set[bool]] = {}
    attempts: dict[str, list[dict[str, Any]]] = {}
    for run in recent:
        outcomes.setdefault((run["image_digest"], run["config_id"]), set()).add(
            passed(run["status"]))
        attempts.setdefault(run.get("rerun_of") or run["run_id"], []).append(run)
    mixed = [{"image_digest": d, "config_id": c} for (d, c), seen in outcomes.items()
             if len(seen) == 2]
    cells = [[r["run_id"] for r in cell] for cell in attempts.values()
             if len({passed(r["status"]) for r in cell}) == 2]
    flips = sum(1 for a, b in zip(recent, recent[1:], strict=False)
                if passed(a["status"]) != passed(b["status"]))
    rate = flips / (len(recent) - 1) if len(recent) > 1 else 0.0
    failure = next((r for r in reversed(recent) if not passed(r["status"])), {})
    return Flakiness(bool(mixed or cells), round(rate, 3), mixed, cells, len(recent),
                     failure.get("signature") or "", failure.get("signature_text") or "")


def slowdown(series: str, values: np.ndarray, settings: HistorySettings) -> Slowdown | None:
    """The latest `confirm` values all worse than median ± k·MAD and by a minimum relative
    change, against the trailing baseline before them; None below the minimum sample."""
    values = values[~np.isnan(values)]
    confirm = settings.slowdown_confirm_runs
    latest, baseline = values[-confirm:], values[:-confirm][-settings.slowdown_baseline_runs:]
    if len(latest) < confirm or len(baseline) < settings.slowdown_min_samples:
        return None
    median = float(np.median(baseline))
    mad = float(np.median(np.abs(baseline - median))) * MAD_TO_SIGMA
    higher_is_worse = series.startswith(DURATION_PREFIX) or series.endswith(":lower")
    sign = 1.0 if higher_is_worse else -1.0
    worse_by = sign * (latest - median)
    threshold = max(settings.slowdown_mad_k * mad, settings.slowdown_min_relative * abs(median))
    if not np.all(worse_by > threshold) or median == 0:
        return None
    magnitude = float(np.min(worse_by)) / abs(median)
    return Slowdown(series, round(median, 4), round(mad, 4), len(baseline),
                    [round(float(v), 4) for v in latest], round(magnitude, 3))


def partition_status(
    last: dict[str, Any] | None, last_is_outage: bool, settings: HistorySettings, now: float,
    flaky: bool, alert: bool,
) -> PartitionStatus:
    if last is None:
        return PartitionStatus.PENDING
    if now - last["finished_at"] > settings.stale_after_h * 3600:
        return PartitionStatus.STALE
    if last_is_outage:
        return PartitionStatus.BROKEN
    if alert:
        return PartitionStatus.FAILING
    if flaky:
        return PartitionStatus.FLAKY
    return PartitionStatus.PASS if passed(last["status"]) else PartitionStatus.FAILING


# --- the whole table -------------------------------------------------------------------------


def outage_flags(table: pd.DataFrame, settings: HistorySettings) -> pd.Series:
    """Failures that say nothing about the product: every infra failure, and every failure of
    a batch (a UTC day) in which at least `outage_min_partitions` partitions ran and at least
    `outage_min_fraction` of them failed. A partition failed in a batch when every run it had
    there failed; a small matrix failing whole is evidence of nothing but its failures."""
    day = (table["started_at"].astype(float) // DAY_S).astype(int)
    failed = ~table["passed"].astype(bool)
    partition_failed = failed.groupby([day, table["partition"]]).all()
    per_day = partition_failed.groupby(level=0).agg(["size", "sum"])
    # A tolerance, so that a fraction such as 0.8 of 5 is met by 4.
    outage_day = ((per_day["size"] >= settings.outage_min_partitions)
                  & (per_day["sum"] >= settings.outage_min_fraction * per_day["size"] - 1e-9))
    in_outage_batch = day.map(outage_day).fillna(False).astype(bool)
    return (table["failure_kind"] == FailureKind.INFRA) | (failed & in_outage_batch)


def _run(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in RUN_FIELDS}


def summarize_partition(
    partition: str, columns: dict[str, list[Any]], series: dict[str, np.ndarray],
    outage: np.ndarray, start: int, end: int, settings: HistorySettings, now: float,
    superseded: np.ndarray | None = None, awaiting: np.ndarray | None = None,
) -> PartitionSummary:
    """One partition's rows are [start, end) of the sorted columns; dicts are built only for
    the few runs a rule reads, which keeps 100,000 rows within a second or two. A cell's
    attempts (deflake reruns) are one run to the alert, streak and regression rules, which read
    its latest (`superseded`: an earlier attempt); flakiness reads them all. A failure awaiting
    its rerun (`awaiting`: only ever the partition's latest row) is no verdict yet."""

    def run(i: int) -> dict[str, Any]:
        return {name: columns[name][i] for name in RUN_FIELDS}

    config, engine = split_partition_key(partition)
    rerunning = run(end - 1) if awaiting is not None and awaiting[end - 1] else None
    judged_end = end - 1 if rerunning else end
    if judged_end == start:
        return PartitionSummary(partition, config, engine, PartitionStatus.PENDING,
                                runs=end - start, rerunning=rerunning)
    in_window = [i for i in range(start, judged_end) if not outage[i]]
    counted = [i for i in in_window if superseded is None or not superseded[i]]
    passes = [passed(columns["status"][i]) for i in counted]
    alert = alert_open(passes, settings.alert_open_after, settings.alert_close_after)
    flakes = flakiness([run(i) for i in in_window[-settings.flaky_window:]],
                       settings.flaky_window)
    streak = failing_streak(passes)
    slow = []
    if passes and passes[-1]:  # slowdowns of a failing partition are noise
        keep = ~outage[start:judged_end]
        for name, values in series.items():
            found = slowdown(name, values[start:judged_end][keep], settings)
            if found:
                slow.append(found)
    last = run(judged_end - 1)
    return PartitionSummary(
        partition=partition, config=config, engine=engine,
        status=partition_status(last, bool(outage[judged_end - 1]), settings, now,
                                flakes.flaky, alert),
        runs=end - start, last=last, failing_streak=streak, alert_open=alert,
        regression=regression_range([run(i) for i in counted[-(streak + 1):]]) if streak else None,
        flakiness=flakes, slowdowns=slow, rerunning=rerunning,
    )


def analyze(
    table: pd.DataFrame, partitions: list[str], settings: HistorySettings, now: float,
    searches: Iterable[dict[str, Any]] = (),
) -> list[PartitionSummary]:
    """A summary per partition: the registry's partitions first, then any others on record.
    `searches`: the culprit searches on record (their latest summaries): a regression whose
    first failure one searched names its verdict."""
    summaries: dict[str, PartitionSummary] = {}
    costs, refused = partition_costs(table), refusals(table)
    # A culprit search's rerun tested an older commit: no rule counts it. Nor a refused or an
    # interrupted run, which neither passed nor failed (once after it, though, a failure no
    # longer awaits its rerun).
    if not table.empty:
        table = with_run_fields(table[~table["trigger"].map(out_of_line)]).sort_values(
            ["partition", "finished_at"], kind="stable")
        table = table.assign(_awaiting=awaiting_rerun(table))
        table = table[table["status"].map(judged)]
    if not table.empty:
        outage = outage_flags(table, settings).to_numpy(dtype=bool)
        superseded = superseded_attempts(table).to_numpy(dtype=bool)
        awaiting = table["_awaiting"].to_numpy(dtype=bool)
        # pandas stores a missing value as NaN: the rules and reports expect None.
        columns = {name: table[name].astype(object).where(table[name].notna(), None).tolist()
                   for name in RUN_FIELDS}
        series = {name: pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=float)
                  for name in series_columns(table)}
        keys = table["partition"].to_numpy()
        # Sorted by partition, each partition's rows are one contiguous slice.
        bounds = [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist(), len(keys)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            summaries[keys[start]] = summarize_partition(
                keys[start], columns, series, outage, start, end, settings, now, superseded,
                awaiting)
    for p in {*costs, *refused} - set(summaries):
        summaries[p] = PartitionSummary(p, *split_partition_key(p), PartitionStatus.PENDING)
    for p, summary in summaries.items():
        summary.cost_usd, summary.refused_since_last_run = costs.get(p), refused.get(p, 0)
    for found in searches:
        summary = summaries.get(found["search"]["partition"])
        regression = summary.regression if summary is not None else None
        if regression and regression["first_fail"].get("sha") == found["search"]["commits"][-1]:
            regression["culprit"] = {"state": found["state"], "commit": found["culprit"],
                                     "text": found["text"]}
    ordered = [summaries.pop(p, None) or PartitionSummary(
        p, *split_partition_key(p), status=PartitionStatus.PENDING) for p in partitions]
    return ordered + [summaries[p] for p in sorted(summaries)]


def cells(table: pd.DataFrame) -> pd.Series:
    """Each row's cell: the run id of its first attempt (deflake reruns share it)."""
    return table["rerun_of"].where(table["rerun_of"].notna() & (table["rerun_of"] != ""),
                                   table["run_id"])


def attempts(table: pd.DataFrame) -> pd.Series:
    """Each row's attempt of its cell (1 for rows recorded before attempts were)."""
    return pd.to_numeric(table["attempt"], errors="coerce").fillna(1).astype(int)


def superseded_attempts(table: pd.DataFrame) -> pd.Series:
    """Rows that a later attempt of their cell (among these rows) stands for."""
    attempt = attempts(table)
    return attempt < attempt.groupby(cells(table)).transform("max")


def awaiting_rerun(table: pd.DataFrame) -> pd.Series:
    """Failures due a deflake rerun that are their partition's latest row (of every status,
    sorted by partition and finish): not yet a verdict. A later row (the rerun, even refused or
    interrupted, or the partition's next run) settles it."""
    due = table["rerun_due"].eq(True) & ~table["status"].map(passed)
    latest = table["partition"].ne(table["partition"].shift(-1))
    return due & latest


def with_run_fields(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every run field, empty where rows from before it existed lack it."""
    missing = [name for name in [*RUN_FIELDS, "rerun_due"] if name not in table]
    return table.assign(**{name: None for name in missing}) if missing else table


@dataclass
class SignatureCluster:
    """Partitions failing now with one signature, and since when it has been seen."""

    signature: str
    text: str
    partitions: list[str]
    runs: int  # every recorded run with this signature
    first_seen: dict[str, Any]  # the first such run: when, image digest, run id, batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def signature_clusters(table: pd.DataFrame, summaries: list[PartitionSummary]
                       ) -> list[SignatureCluster]:
    """The signatures of the partitions whose latest run failed, each with every such
    partition, most partitions first: "3 partitions fail with X since image B"."""
    failing: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for summary in summaries:
        last = summary.last or {}
        if last.get("signature") and not passed(last.get("status")):
            failing.setdefault(last["signature"], []).append(summary.partition)
            texts[last["signature"]] = last.get("signature_text") or ""
    if not failing:
        return []
    rows = with_run_fields(table)
    rows = rows[rows["signature"].isin(list(failing))].sort_values("finished_at", kind="stable")
    clusters = []
    for signature, partitions in failing.items():
        seen = rows[rows["signature"] == signature]
        first = seen.iloc[0]
        clusters.append(SignatureCluster(
            signature, texts[signature], sorted(partitions), len(seen),
            {"finished_at": float(first["finished_at"]), "run_id": first["run_id"],
             "image_digest": first["image_digest"], "partition": first["partition"],
             "batch": first["batch"] or None}))
    return sorted(clusters, key=lambda c: (-len(c.partitions), c.first_seen["finished_at"]))


def partition_costs(table: pd.DataFrame) -> dict[str, float]:
    """Each partition's recorded cost, summed over its runs that carry one."""
    if table.empty or "cost_usd" not in table:
        return {}
    known = table[pd.to_numeric(table["cost_usd"], errors="coerce").notna()]
    return {str(k): round(float(v), 6) for k, v in
            pd.to_numeric(known["cost_usd"]).groupby(known["partition"]).sum().items()}


def refusals(table: pd.DataFrame) -> dict[str, int]:
    """Per partition, how many of its latest records in a row are refusals (skip)."""
    skips = table["status"] == LIFECYCLE_SKIP if not table.empty else None
    if skips is None or not skips.any():
        return {}
    found = {}
    refused = table[table["partition"].isin(table.loc[skips, "partition"])]
    for key, rows in refused.sort_values("finished_at", kind="stable").groupby("partition"):
        statuses = rows["status"].tolist()
        count = len(statuses) - next((i + 1 for i in range(len(statuses) - 1, -1, -1)
                                      if statuses[i] != LIFECYCLE_SKIP), 0)
        if count:
            found[str(key)] = count
    return found


def coverage(summaries: list[PartitionSummary]) -> dict[str, int]:
    """Counts for `mlci status`: tested, untested, stale, passing, failing, and each status."""
    counts = {str(s): 0 for s in PartitionStatus}
    for summary in summaries:
        counts[str(summary.status)] += 1
    return {
        "partitions": len(summaries),
        "tested": sum(1 for s in summaries if s.runs),
        "untested": sum(1 for s in summaries if not s.runs),
        "stale": counts["STALE"],
        "passing": counts["PASS"],
        "failing": counts["FAILING"] + counts["BROKEN"],
        "flaky": counts["FLAKY"],
        **{f"status_{k.lower()}": v for k, v in counts.items()},
    }
