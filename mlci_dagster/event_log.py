"""Reads `results` records from the Dagster event log (the source of truth) after a cursor, and
the test cases each kept (the per-test history)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from mlci_dagster.history.cases import append_cases, case_rows
from mlci_dagster.history.record import ArtifactRecord, ResultRecord
from mlci_dagster.history.table import append_rows, record_to_row, with_late_uploads
from mlci_dagster.junit.read import read_report
from mlci_dagster.vocabulary import RESULTS

RESULTS_ASSET = dg.AssetKey(RESULTS)
RUN_ARTIFACTS = dg.AssetKey("run_artifacts")  # evidence stored after its run
STORED = TypeAdapter(dict[str, ArtifactRecord])  # a run_artifacts event's `artifacts`
PAGE = 1000
LOOK_BACK = 200  # a partition's latest results read where its recent past is wanted
log = logging.getLogger("mlci")


def read_record(storage_id: int, metadata: Mapping[str, Any]) -> ResultRecord | None:
    """The validated record a results materialization carries; None (and a warning naming the
    event) when it carries none or a malformed one."""
    entry = metadata.get("record")
    if entry is None:
        return None
    try:
        return ResultRecord.model_validate(entry.value)
    except ValidationError as exc:
        log.warning(f"results event {storage_id}: malformed record, skipped: {exc}")
        return None


def new_results(instance: dg.DagsterInstance, after: int) -> Iterator[tuple[int, ResultRecord]]:
    """(storage id, record) of every valid results materialization after storage id `after`."""
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, after_storage_id=after or None),
            limit=PAGE, cursor=cursor, ascending=True,
        )
        for record in page.records:
            materialization = record.asset_materialization
            found = read_record(record.storage_id, materialization.metadata) \
                if materialization is not None else None
            if found is not None:
                yield record.storage_id, found
        if not page.has_more:
            return
        cursor = page.cursor


def latest_result_id(instance: dg.DagsterInstance) -> int:
    """The storage id of the newest results materialization; 0 when none is recorded."""
    latest = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RESULTS_ASSET), limit=1).records
    return latest[0].storage_id if latest else 0


def record_of_run(instance: dg.DagsterInstance, run_id: str) -> ResultRecord | None:
    """The results record the run stored; None when it stored none (or a malformed one)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        event = entry.asset_materialization
        if event is not None and event.asset_key == RESULTS_ASSET:
            return read_record(0, event.metadata)  # 0: a warning names no event
    return None


def partition_results(instance: dg.DagsterInstance, partition: str, before: int | None = None,
                      limit: int = LOOK_BACK) -> list[ResultRecord]:
    """The partition's judged results in line (no culprit search's rerun), newest first, among
    its last `limit` before storage id `before` (default: the latest): one per cell, its latest
    attempt (the newest, a failure awaiting its rerun, is no verdict yet; one whose rerun was
    refused or interrupted stands)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, asset_partitions=[partition],
                              before_storage_id=before), limit=limit).records
    found = [read_record(r.storage_id, r.asset_materialization.metadata)
             for r in records if r.asset_materialization is not None]
    cells: set[str] = set()
    kept, newest = [], True
    for record in found:
        if record is None or record.out_of_line:
            continue
        first, newest = newest, False
        if not record.judged or record.cell in cells:
            continue
        cells.add(record.cell)
        if not (first and record.awaiting_rerun):
            kept.append(record)
    return kept


def last_pass_before(instance: dg.DagsterInstance, record: ResultRecord, look_back: int = 50
                     ) -> ResultRecord | None:
    """The partition's latest passing result in line before `record`, among its last
    `look_back`."""
    return next((found for found in partition_results(instance, record.partition,
                                                      limit=look_back)
                 if found.passed and found.finished_at < record.finished_at), None)


def consolidate(
    instance: dg.DagsterInstance, table: pd.DataFrame | None
) -> tuple[pd.DataFrame, int]:
    """The table with every result recorded after its last row appended: (table, rows added).

    The cursor is the table's own highest storage id, so the table and cursor cannot disagree.
    """
    cursor = 0 if table is None or table.empty else int(table["storage_id"].max())
    rows = [record_to_row(record, storage_id) for storage_id, record in new_results(instance,
                                                                                     cursor)]
    return with_late_uploads(append_rows(table, rows), late_uploads(instance)), len(rows)


def latest_late_upload_id(instance: dg.DagsterInstance) -> int:
    """The storage id of the newest `run_artifacts` observation; 0 when none is recorded."""
    latest = instance.fetch_observations(RUN_ARTIFACTS, limit=1).records
    return latest[0].storage_id if latest else 0


def late_uploads(instance: dg.DagsterInstance) -> dict[str, dict[str, ArtifactRecord]]:
    """Run id -> local path -> what was stored, of every piece of evidence the artifact_upload
    sensor stored after its run (its `run_artifacts` observations; few: a store's outages)."""
    found: dict[str, dict[str, ArtifactRecord]] = {}
    cursor = None
    while True:
        page = instance.fetch_observations(RUN_ARTIFACTS, limit=PAGE, cursor=cursor,
                                           ascending=True)
        for record in page.records:
            event = record.asset_observation
            if event is None or "run_id" not in event.metadata:
                continue
            stored = event.metadata.get("artifacts")
            try:
                pieces = STORED.validate_python(stored.value if stored is not None else {})
            except ValidationError as exc:
                log.warning(f"run_artifacts event {record.storage_id}: malformed, skipped: {exc}")
                continue
            found.setdefault(str(event.metadata["run_id"].value), {}).update(pieces)
        if not page.has_more:
            return found
        cursor = page.cursor


def with_late_records(records: dict[str, ResultRecord],
                      late: dict[str, dict[str, ArtifactRecord]]) -> dict[str, ResultRecord]:
    """`records` (by any key) with the evidence each run's late uploads stored."""
    return {key: record.model_copy(update={"artifacts": {**record.artifacts,
                                                         **late[record.run_id]}})
            if record.run_id in late else record for key, record in records.items()}


def consolidate_cases(instance: dg.DagsterInstance, table: pd.DataFrame | None, after: int
                      ) -> tuple[pd.DataFrame, int, int]:
    """The test history with the cases of every result recorded after storage id `after`
    appended: (table, rows added, the newest storage id read). A result without tests adds no
    row, so the cursor is kept beside the table. A kept report that is gone (its log directory
    cleaned, another machine's) is named in a warning and skipped."""
    frames, newest = [], after
    for storage_id, record in new_results(instance, after):
        newest = storage_id
        if record.out_of_line:  # a culprit search's rerun of an older commit
            continue
        for pipeline, path in record.test_reports.items():
            report = read_report(Path(path))  # written redacted and bounded
            if report.problem is not None:
                log.warning(f"results event {storage_id}: tests of {record.partition} "
                            f"'{pipeline}' not read: {report.problem}")
            frames.append(case_rows(record, storage_id, pipeline, report.cases))
    return append_cases(table, frames), sum(len(f) for f in frames), newest
