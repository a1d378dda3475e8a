"""The test history: one row per test case per run, as the pipelines' reports said it.

Columnar and compact: the repeated strings (test ids, partitions, runs, batches, images) are
pandas categoricals, so 3 million rows stay small in memory and on disk. Appended as `history`
is: the rows of every result recorded after the table's last storage id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from mlci_dagster.history.record import ResultRecord

# What a run says of every test it ran, and the run's own facts a range names.
RUN_COLUMNS = ["run_id", "partition", "batch", "image_digest", "config_id", "code_version"]
CASE_COLUMNS = ["pipeline", "test_id", "status", "message", "signature"]
# A run's finish time too: one value per run, stored once (its codes are 2 bytes, not 8).
CATEGORICAL = [*RUN_COLUMNS, *CASE_COLUMNS, "finished_at"]
COLUMNS = ["storage_id", "finished_at", *RUN_COLUMNS, *CASE_COLUMNS, "duration_s", "flaky"]
FAILED = ("fail", "error")


def empty_cases() -> pd.DataFrame:
    return pd.DataFrame({
        "storage_id": pd.Series(dtype="int64"),
        **{c: pd.Series(dtype="category") for c in CATEGORICAL},
        "duration_s": pd.Series(dtype="float32"), "flaky": pd.Series(dtype="bool")})


def case_rows(record: ResultRecord, storage_id: int, pipeline: str, cases: Iterable[Any]
              ) -> pd.DataFrame:
    """The rows of one pipeline's cases in one run; `cases` have `id`, `status`,
    `duration_s`, `message`, `signature` and `flaky` (junit/read.py's TestCase)."""
    ids, statuses, durations, messages, signatures, flaky = [], [], [], [], [], []
    for case in cases:
        ids.append(case.id)
        statuses.append(str(case.status))
        durations.append(case.duration_s)
        failed = statuses[-1] in FAILED
        messages.append(case.message if failed else "")  # a passing test's says nothing
        signatures.append(case.signature if failed else "")
        flaky.append(case.flaky)
    n = len(ids)
    run = record.to_json()
    frame = pd.DataFrame({
        "storage_id": np.full(n, storage_id, dtype="int64"),
        "finished_at": pd.Categorical(np.full(n, record.finished_at, dtype="float64")),
        **{c: pd.Categorical([run.get(c) or ""] * n) for c in RUN_COLUMNS},
        "pipeline": pd.Categorical([pipeline] * n), "test_id": pd.Categorical(ids),
        "status": pd.Categorical(statuses), "message": pd.Categorical(messages),
        "signature": pd.Categorical(signatures),
        "duration_s": np.asarray(durations, dtype="float32"),
        "flaky": np.asarray(flaky, dtype="bool")})
    return frame[COLUMNS]


def append_cases(table: pd.DataFrame | None, frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """The table with `frames` appended, categoricals merged (their codes, not their strings,
    are copied); rows at or below the table's last storage id are already in it."""
    table = empty_cases() if table is None else table
    last = int(table["storage_id"].max()) if len(table) else 0
    new = [f for f in frames if len(f) and int(f["storage_id"].iloc[0]) > last]
    if not new:
        return table
    parts = [table, *new] if len(table) else new
    merged = {c: union_categoricals([p[c].astype("category") for p in parts],
                                    ignore_order=True) for c in CATEGORICAL}
    plain = {c: np.concatenate([p[c].to_numpy() for p in parts])
             for c in COLUMNS if c not in merged}
    return pd.DataFrame({c: merged[c] if c in merged else plain[c] for c in COLUMNS})
