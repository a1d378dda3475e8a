"""The history table: one row per `results` record, flat, append-only, keyed by (config, engine).

Durations and metrics are wide columns named `duration:stage:<stage>`,
`duration:pipeline:<pipeline>` and `metric:<name>:<lower|higher>`, so analysis reads a column
per series and knows which way is better from the name alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from mlci_dagster.history.links import evidence_keys
from mlci_dagster.history.record import ArtifactRecord, ResultRecord
from mlci_dagster.history.signature import signature_of

BASE_COLUMNS = [
    "storage_id", "run_id", "partition", "config", "engine", "config_id", "status", "passed",
    "failed_stage", "failure_kind", "image_digest", "code_version", "trigger", "started_at",
    "finished_at", "duration_s", "stages", "cost_usd", "signature", "signature_text",
    "batch", "log_ref", "debug_bundle", "sha", "attempt", "rerun_of", "rerun_due",
    "log_key", "bundle_key",  # the artifact store's keys of its log and bundle, once stored
]
# Text columns hold None where a run has no value (a skip has no image digest): pandas would
# store such a gap as NaN (a float) in a column of strings, which string code then trips on.
TEXT_COLUMNS = [c for c in BASE_COLUMNS
                if c not in ("storage_id", "passed", "started_at", "finished_at", "duration_s",
                             "cost_usd", "attempt", "rerun_due")]
DURATION_PREFIX = "duration:"
METRIC_PREFIX = "metric:"


def record_to_row(record: ResultRecord, storage_id: int) -> dict[str, Any]:
    data = record.to_json()
    row = {column: data.get(column) for column in BASE_COLUMNS}
    row["storage_id"] = storage_id
    row["passed"] = record.passed
    row["log_key"], row["bundle_key"] = evidence_keys(record.artifacts, record.log_ref,
                                                      record.debug_bundle)
    found = signature_of(record.failed_stage, record.failure_kind, record.error_summary)
    row["signature"], row["signature_text"] = (found.id, found.text) if found else (None, None)
    # Per-stage statuses stay whole (JSON) for the grid; their durations become columns.
    row["stages"] = json.dumps({str(s): str(v.status) for s, v in record.stages.items()})
    for stage, outcome in record.stages.items():
        row[f"{DURATION_PREFIX}stage:{stage}"] = outcome.duration_s
    for name, pipeline in record.pipelines.items():
        if pipeline.passed:  # a failed run's duration says nothing about speed
            row[f"{DURATION_PREFIX}pipeline:{name}"] = pipeline.duration_s
    for name, metric in record.metrics.items():
        way = "lower" if metric.direction == "lower_is_better" else "higher"
        row[f"{METRIC_PREFIX}{name}:{way}"] = metric.value
    return row


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype="object") for column in BASE_COLUMNS})


def with_text_gaps_as_none(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every text column of plain objects, a gap None (never NaN)."""
    present = [c for c in TEXT_COLUMNS if c in table]
    return table.assign(**{c: table[c].astype(object).where(table[c].notna(), None)
                           for c in present})


def append_rows(table: pd.DataFrame | None, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The table with `rows` appended; rows already present (same storage id) are skipped.
    Every table the history holds comes out of here, its text gaps None."""
    new = pd.DataFrame(list(rows))
    if table is None or table.empty:
        table = new if not new.empty else empty_table()
    elif not new.empty:
        # Append-only: a row at or below the table's last storage id is already in it.
        new = new[new["storage_id"] > table["storage_id"].max()]
        table = pd.concat([table, new], ignore_index=True)
    return with_text_gaps_as_none(table)


def with_late_uploads(table: pd.DataFrame, late: Mapping[str, Mapping[str, ArtifactRecord]]
                      ) -> pd.DataFrame:
    """The table with the keys of evidence stored after its run (the artifact_upload sensor's
    retries; `late`: run id -> local path -> what was stored) where its rows had none."""
    if table.empty or not late:
        return table
    table = table.assign(**{c: None for c in ("log_key", "bundle_key") if c not in table})
    for index in table.index[table["run_id"].isin(list(late))]:
        log_key, bundle_key = evidence_keys(late[table.at[index, "run_id"]],
                                            table.at[index, "log_ref"] or "",
                                            table.at[index, "debug_bundle"] or "")
        for column, key in (("log_key", log_key), ("bundle_key", bundle_key)):
            if key and not table.at[index, column]:
                table.at[index, column] = key
    return table


def series_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith((DURATION_PREFIX, METRIC_PREFIX))]

