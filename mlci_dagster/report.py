"""The latest result of each partition, read from the Dagster event log, as a table or JSON."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import dagster as dg

RESULTS_ASSET = dg.AssetKey("results")


def latest_records(
    instance: dg.DagsterInstance, partitions: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """One row per (config, engine): its latest `results` record, or `untested`."""
    rows = []
    for config, engine in partitions:
        key = f"{config}|{engine}"
        found = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, asset_partitions=[key]), limit=1
        ).records
        if found:
            materialization = found[0].asset_materialization
            assert materialization is not None
            rows.append(dict(materialization.metadata["record"].value))
        else:
            rows.append({"partition": key, "config": config, "engine": engine,
                         "status": "untested"})
    return rows


def _age(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0, now - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def format_table(rows: list[dict[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ("PARTITION", "STATUS", "FAILED STAGE", "KIND", "DURATION", "WHEN", "RUN")
    lines = [header]
    for row in rows:
        finished = row.get("finished_at")
        when = (f"{dt.datetime.fromtimestamp(finished, dt.UTC):%Y-%m-%d %H:%M}Z "
                f"({_age(finished, now)})" if finished else "-")
        lines.append((
            row["partition"], row["status"], row.get("failed_stage") or "-",
            row.get("failure_kind") or "-",
            f"{row['duration_s']:.1f}s" if "duration_s" in row else "-",
            when, (row.get("run_id") or "-")[:8],
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
