"""Reads `results` records from the Dagster event log (the source of truth) after a cursor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandas as pd

from mlci_dagster.history.table import append_rows, record_to_row

RESULTS_ASSET = dg.AssetKey("results")
PAGE = 1000


def new_results(instance: dg.DagsterInstance, after: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(storage id, record) of every results materialization after storage id `after`."""
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, after_storage_id=after or None),
            limit=PAGE, cursor=cursor, ascending=True,
        )
        for record in page.records:
            materialization = record.asset_materialization
            if materialization is not None and "record" in materialization.metadata:
                yield record.storage_id, dict(materialization.metadata["record"].value)
        if not page.has_more:
            return
        cursor = page.cursor


def consolidate(
    instance: dg.DagsterInstance, table: pd.DataFrame | None
) -> tuple[pd.DataFrame, int]:
    """The table with every result recorded after its last row appended: (table, rows added).

    The cursor is the table's own highest storage id, so the table and cursor cannot disagree.
    """
    cursor = 0 if table is None or table.empty else int(table["storage_id"].max())
    rows = [record_to_row(record, storage_id) for storage_id, record in new_results(instance,
                                                                                     cursor)]
    return append_rows(table, rows), len(rows)
