"""The test history analysed per (partition, test), never mixing partitions: each test's status
now, its failing streak and regression range (last pass -> first failure, with both runs'
images, harness versions and batches), flakiness (flips between pass and fail in the window,
or a producer's own rerun), slowdowns, and tests new in the latest run or gone from it.

A test that flips is flaky and opens no regression; one that fails in every run since a pass
opens one and names the range. Vectorised over the whole table (numpy over rows sorted by
partition, test and time): three million rows in seconds.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlci_dagster.history.cases import FAILED
from mlci_dagster.registry.models import HistorySettings

RANGE_FIELDS = ["run_id", "batch", "image_digest", "config_id", "code_version", "finished_at"]


class TestState(enum.StrEnum):
    __test__ = False  # a name pytest would otherwise collect

    FAILING = "failing"  # failed in every run since its last pass: a regression
    FLAKY = "flaky"  # passed and failed in the window
    PASSING = "passing"
    SKIPPED = "skipped"  # skipped in its latest run
    VANISHED = "vanished"  # in the partition's previous run, not in its latest


@dataclass
class TestSummary:
    """One test of one partition, as the history says it now."""

    __test__ = False

    partition: str
    pipeline: str
    test_id: str
    state: TestState
    status: str  # in its latest run
    runs: int
    failing_streak: int
    flips: int
    message: str = ""
    signature: str = ""
    new: bool = False  # first seen in the partition's latest run
    duration_s: float = 0.0
    baseline_s: float | None = None  # the median of its recent passing durations
    slower_by: float = 0.0  # relative: 0.5 = 50% slower than its baseline; 0 when not slow
    last_pass: dict[str, Any] | None = None
    first_failure: dict[str, Any] | None = None

    @property
    def regression(self) -> bool:
        return self.state is TestState.FAILING and self.last_pass is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        return data


def _group_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each run of equal keys in a sorted array."""
    change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = np.concatenate(([0], change))
    return starts, np.concatenate((change, [len(keys)]))


class _Text:
    """A categorical column read row by row without making a string of every row."""

    def __init__(self, column: pd.Series) -> None:
        self.names = column.cat.categories.astype(str).to_numpy()
        self.codes = column.cat.codes.to_numpy()

    def __getitem__(self, i: int) -> str:
        code = self.codes[i]
        return str(self.names[code]) if code >= 0 else ""

    def isin(self, values: tuple[str, ...]) -> np.ndarray:
        return np.isin(self.codes, np.flatnonzero(np.isin(self.names, values)))


def _ranged(table: pd.DataFrame, index: np.ndarray, valid: np.ndarray) -> list[dict | None]:
    texts = {c: _Text(table[c]) for c in RANGE_FIELDS if c != "finished_at"}
    finished = table["finished_at"].to_numpy()
    return [{**{c: text[i] or None for c, text in texts.items()},
             "finished_at": float(finished[i])} if ok else None
            for i, ok in zip(index, valid, strict=True)]


def analyze_cases(table: pd.DataFrame, settings: HistorySettings) -> list[TestSummary]:
    """A summary per (partition, test) the table holds, failing first, then flaky, then
    slowest, then by name."""
    if table.empty:
        return []
    table = table.sort_values(["partition", "test_id", "storage_id"], kind="stable",
                              ignore_index=True)
    part = table["partition"].cat.codes.to_numpy()
    test = table["test_id"].cat.codes.to_numpy()
    key = part.astype(np.int64) * (int(test.max()) + 1) + test
    starts, ends = _group_bounds(key)
    lasts = ends - 1
    status = _Text(table["status"])
    failed = status.isin(FAILED)
    judged = ~status.isin(("skip",))
    group = np.repeat(np.arange(len(starts)), ends - starts)
    # The last judged row of each group, and the last pass at or before it.
    judged_index = np.where(judged, np.arange(len(table)), -1)
    last_judged = np.maximum.reduceat(judged_index, starts)
    pass_index = np.where(judged & ~failed, np.arange(len(table)), -1)
    pass_so_far = np.maximum.accumulate(pass_index)  # within a group once clipped to it
    has_judged = last_judged >= starts
    at = np.where(has_judged, last_judged, lasts)
    last_pass = np.where(has_judged, pass_so_far[at], -1)
    last_pass = np.where(last_pass >= starts, last_pass, -1)
    failing_now = has_judged & failed[at]
    # The failing streak: judged rows after the last pass, up to the last judged one.
    judged_count = np.cumsum(judged)
    before = np.where(last_pass >= 0, judged_count[np.maximum(last_pass, 0)],
                      np.where(starts > 0, judged_count[starts - 1], 0))
    streak = np.where(failing_now, judged_count[at] - before, 0)
    first_fail = _first_judged_after(judged, np.where(last_pass >= 0, last_pass + 1, starts),
                                     at, failing_now)
    # Flips between pass and fail among each test's last `flaky_window` judged runs.
    rank = judged_count[at][group] - judged_count  # judged rows after this one, per group
    in_window = judged & (rank < settings.flaky_window)
    window_index = np.where(in_window, np.arange(len(table)), -1)
    prev = _previous_in_group(window_index, starts, group)
    flip = (prev >= 0) & (failed != failed[np.maximum(prev, 0)]) & in_window
    flips = np.bincount(group, weights=flip, minlength=len(starts)).astype(int)
    producer_flaky = np.bincount(group, weights=in_window & table["flaky"].to_numpy(),
                                 minlength=len(starts)) > 0
    flaky = (flips >= 2) | producer_flaky
    slow = _slowdowns(table, group, starts, at, judged & ~failed, rank, settings)
    # New and vanished, against the partition's latest and previous runs.
    storage = table["storage_id"].to_numpy()
    runs = pd.Series(storage).groupby(part).unique()
    latest = {p: max(s) for p, s in runs.items()}
    previous = {p: sorted(s)[-2] if len(s) > 1 else None for p, s in runs.items()}
    group_part = part[starts]
    new = np.array([storage[s] == latest[p] and previous[p] is not None
                    for s, p in zip(starts, group_part, strict=True)])
    vanished = np.array([storage[e] != latest[p] and storage[e] == previous[p]
                         for e, p in zip(lasts, group_part, strict=True)])
    passes = _ranged(table, np.maximum(last_pass, 0), failing_now & (last_pass >= 0))
    fails = _ranged(table, np.maximum(first_fail, 0), failing_now)
    columns = {c: _Text(table[c]) for c in ("partition", "pipeline", "test_id", "message",
                                             "signature")}
    durations = table["duration_s"].to_numpy()
    summaries = []
    for g, (s, e) in enumerate(zip(starts, ends, strict=True)):
        i = at[g]
        state = (TestState.VANISHED if vanished[g] else TestState.SKIPPED
                 if not has_judged[g] or status[lasts[g]] == "skip" else
                 TestState.FLAKY if flaky[g] else TestState.FAILING if failing_now[g]
                 else TestState.PASSING)
        summaries.append(TestSummary(
            partition=columns["partition"][s], pipeline=columns["pipeline"][lasts[g]],
            test_id=columns["test_id"][s], state=state, status=status[lasts[g]],
            runs=int(e - s), failing_streak=int(streak[g]), flips=int(flips[g]),
            message=columns["message"][i] if failed[i] else "",
            signature=columns["signature"][i] if failed[i] else "", new=bool(new[g]),
            duration_s=round(float(durations[lasts[g]]), 3),
            baseline_s=slow[0][g], slower_by=slow[1][g],
            last_pass=passes[g] if state is TestState.FAILING else None,
            first_failure=fails[g] if failing_now[g] else None))
    order = {TestState.FAILING: 0, TestState.FLAKY: 1}
    return sorted(summaries, key=lambda t: (order.get(t.state, 2), -t.slower_by, t.partition,
                                            t.test_id))


def _previous_in_group(index: np.ndarray, starts: np.ndarray, group: np.ndarray) -> np.ndarray:
    """For each row, the nearest earlier row of its group where `index` is set (-1: none)."""
    shifted = np.concatenate(([-1], index[:-1]))
    nearest = np.maximum.accumulate(shifted)
    return np.where(nearest >= starts[group], nearest, -1)


def _first_judged_after(judged: np.ndarray, from_: np.ndarray, to: np.ndarray,
                        wanted: np.ndarray) -> np.ndarray:
    """The first judged row in [from_, to] of each group where `wanted` (-1 elsewhere)."""
    following = np.where(judged, np.arange(len(judged)), len(judged))
    nearest = np.minimum.accumulate(following[::-1])[::-1]  # the next judged row at or after
    first = nearest[np.minimum(from_, len(judged) - 1)]
    return np.where(wanted & (first <= to), first, -1)


def _slowdowns(table: pd.DataFrame, group: np.ndarray, starts: np.ndarray, at: np.ndarray,
               passed: np.ndarray, rank: np.ndarray, settings: HistorySettings
               ) -> tuple[list[float | None], list[float]]:
    """Per group: the baseline (the median of its passing durations in the window before its
    latest judged run) and how much slower that run was, when it passed and was slower by more
    than `slowdown_mad_k` scaled MADs and `slowdown_min_relative`; else 0."""
    durations = table["duration_s"].to_numpy().astype(float)
    base = passed & (rank >= 1) & (rank <= settings.slowdown_baseline_runs)
    frame = pd.DataFrame({"g": group[base], "d": durations[base]})
    grouped = frame.groupby("g")["d"]
    median = grouped.median()
    count = grouped.size()
    deviation = (frame["d"] - frame["g"].map(median)).abs()
    mad = deviation.groupby(frame["g"]).median() * 1.4826
    n = len(starts)
    med = np.full(n, np.nan)
    med[median.index.to_numpy()] = median.to_numpy()
    spread = np.zeros(n)
    spread[mad.index.to_numpy()] = mad.to_numpy()
    samples = np.zeros(n, dtype=int)
    samples[count.index.to_numpy()] = count.to_numpy()
    latest = durations[at]
    threshold = np.maximum(settings.slowdown_mad_k * spread,
                           settings.slowdown_min_relative * np.abs(med))
    slow = (passed[at] & (samples >= settings.slowdown_min_samples) & (med > 0)
            & (latest - med > threshold))
    slower_by = np.where(slow, (latest - med) / np.where(med > 0, med, 1), 0.0)
    return ([None if np.isnan(m) else round(float(m), 3) for m in med],
            [round(float(x), 3) for x in slower_by])
