"""A TestGrid-like HTML grid: rows config × engine, columns runs (newest first), coloured cells
with the failing stage on hover, and a duration trend per partition. One self-contained file."""

from __future__ import annotations

import datetime as dt
import html
import json

import pandas as pd

from mlci_dagster.history.analysis import PartitionSummary
from mlci_dagster.history.render import regression_text, short, usd
from mlci_dagster.vocabulary import LIFECYCLE_PASS, LIFECYCLE_SKIP, FailureKind, passed, skipped

COLUMNS = 30
COLOURS = {LIFECYCLE_PASS: "#2da44e", FailureKind.PRODUCT: "#cf222e",
           FailureKind.TIMEOUT: "#bc4c00", FailureKind.INFRA: "#8250df",
           LIFECYCLE_SKIP: "#afb8c1"}
STATUS_COLOURS = {"PASS": "#2da44e", "FLAKY": "#d4a72c", "FAILING": "#cf222e",
                  "BROKEN": "#8250df", "STALE": "#8c959f", "PENDING": "#d0d7de"}

STYLE = """
body { font: 13px system-ui, sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #59636e; margin-bottom: 16px; }
table { border-collapse: collapse; } td, th { padding: 2px 6px; white-space: nowrap; }
th { text-align: left; font-weight: 600; color: #59636e; }
td.name { font-family: ui-monospace, monospace; }
.badge { color: white; border-radius: 3px; padding: 1px 6px; font-size: 11px; font-weight: 600; }
.cell { display: inline-block; width: 16px; height: 16px; border-radius: 2px; margin-right: 2px;
        vertical-align: middle; }
.cell:hover { outline: 2px solid #1f2328; }
.legend span { margin-right: 12px; } .reg { color: #cf222e; font-size: 12px; }
"""


def sparkline(values: list[float], width: int = 120, height: int = 22) -> str:
    """An inline SVG of durations, oldest left, with the latest point marked."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    points = [(i * step, height - 2 - (v - low) / span * (height - 4))
              for i, v in enumerate(values)]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    x, y = points[-1]
    return (f'<svg width="{width}" height="{height}"><title>duration {low:.1f}s–{high:.1f}s'
            f'</title><polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{path}"/>'
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#0969da"/></svg>')


def _cell(row: pd.Series) -> str:
    status = row["status"]
    colour = COLOURS[LIFECYCLE_PASS] if passed(status) else COLOURS[LIFECYCLE_SKIP] \
        if skipped(status) else COLOURS.get(row["failure_kind"] or "",
                                            COLOURS[FailureKind.PRODUCT])
    cost = row.get("cost_usd")
    when = dt.datetime.fromtimestamp(row["finished_at"], dt.UTC).strftime("%Y-%m-%d %H:%M")
    stages = json.loads(row["stages"]) if row["stages"] else {}
    title = "\n".join([
        f"{status}" + (f" ({row['failure_kind']})" if row["failure_kind"] else ""),
        f"{when}Z, {row['duration_s']:.1f}s, {row['trigger']}"
        + (f", ${cost:.4f}" if isinstance(cost, float) and cost == cost else ""),
        f"image {short(row['image_digest'])}, config {row['config_id']}",
        "stages: " + ", ".join(f"{k} {v}" for k, v in stages.items()),
        f"run {row['run_id']}",
    ])
    return f'<span class="cell" style="background:{colour}" title="{html.escape(title)}"></span>'


def render_grid(table: pd.DataFrame, summaries: list[PartitionSummary], now: float) -> str:
    by_partition = {p: rows.sort_values("finished_at") for p, rows in table.groupby("partition")} \
        if not table.empty else {}
    lines = []
    for s in summaries:
        rows = by_partition.get(s.partition)
        cells = "" if rows is None else "".join(
            _cell(row) for _, row in rows.iloc[::-1].head(COLUMNS).iterrows())
        ran = None if rows is None else rows[rows["status"] != LIFECYCLE_SKIP]
        trend = "" if ran is None else sparkline(
            [float(v) for v in ran["duration_s"].tail(COLUMNS)])
        regression = regression_text(s)
        extra = f'<div class="reg">{html.escape(regression)}</div>' if regression != "-" else ""
        badge = (f'<span class="badge" style="background:{STATUS_COLOURS[str(s.status)]}">'
                 f'{s.status}</span>')
        lines.append(f'<tr><td class="name">{html.escape(s.config)}</td>'
                     f'<td class="name">{html.escape(s.engine)}</td><td>{badge}</td>'
                     f'<td>{cells}{extra}</td><td>{trend}</td>'
                     f'<td>{usd(s.cost_usd) if s.cost_usd else ""}</td></tr>')
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d %H:%M")
    legend = "".join(f'<span><span class="cell" style="background:{c}"></span>{k}</span>'
                     for k, c in COLOURS.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mlci grid</title><style>{STYLE}</style></head>
<body><h1>mlci-dagster: lifecycle grid</h1>
<div class="sub">{len(summaries)} partitions, {len(table)} results, as of {stamp}Z.
Newest run first; hover a cell for its stages.</div>
<div class="legend">{legend}</div><br>
<table><tr><th>config</th><th>engine</th><th>status</th><th>runs (newest first)</th>
<th>duration, oldest → newest</th><th>cost, all runs</th></tr>
{chr(10).join(lines)}
</table></body></html>
"""
