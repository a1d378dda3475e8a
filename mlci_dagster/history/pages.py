"""One partition's page of the published site: its status and regression, its runs newest first
(each linked to its Dagster run, and a failure to its log and debug bundle), and every test its
pipelines reported, failing first: the drill-down behind a grid row."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import pandas as pd

from mlci_dagster.history.analysis import PartitionSummary
from mlci_dagster.history.case_analysis import TestSummary
from mlci_dagster.history.grid import STATUS_COLOURS, STYLE, TEST_COLOURS, colour_of
from mlci_dagster.history.links import Linking
from mlci_dagster.history.render import regression_text, short, test_history_text
from mlci_dagster.vocabulary import passed

RUNS_SHOWN = 50


def _when(moment: float) -> str:
    return f"{dt.datetime.fromtimestamp(moment, dt.UTC):%Y-%m-%d %H:%M}Z"


def _links(row: dict[str, Any], linking: Linking) -> str:
    links = linking.of_row(row)
    return " · ".join(f'<a href="{html.escape(url)}">{name}</a>' for name, url in (
        ("run", links.run), ("log", links.log), ("debug bundle", links.bundle)) if url)


def _run_row(row: dict[str, Any], linking: Linking) -> str:
    status = str(row["status"])
    kind = f" ({row['failure_kind']})" if row.get("failure_kind") else ""
    attempt = int(row.get("attempt") or 1)
    return (f'<tr><td class="name">{_when(row["finished_at"])}</td>'
            f'<td><span class="cell" style="background:{colour_of(row)}"></span> '
            f'{html.escape(status + kind)}</td>'
            f'<td>{attempt if attempt > 1 else ""}</td>'
            f'<td>{html.escape(row.get("batch") or row.get("trigger") or "")}</td>'
            f'<td class="name">{html.escape(short(row.get("image_digest")))}</td>'
            f'<td>{float(row["duration_s"]):.1f}s</td>'
            f'<td>{"" if passed(status) else html.escape(row.get("signature_text") or "")}</td>'
            f'<td>{_links(row, linking)}</td></tr>')


def _test_row(test: TestSummary) -> str:
    return (f'<tr><td class="name">{html.escape(test.test_id)}</td>'
            f'<td><span class="cell" style="background:{TEST_COLOURS.get(test.status, "#afb8c1")}'
            f'"></span> {html.escape(str(test.state))}</td><td>{test.runs}</td>'
            f'<td>{html.escape(test_history_text(test))}</td>'
            f'<td>{html.escape(test.message.splitlines()[0] if test.message else "")}</td></tr>')


def render_partition_page(summary: PartitionSummary, rows: pd.DataFrame,
                          tests: list[TestSummary], linking: Linking, grid_href: str,
                          now: float) -> str:
    """The page; `rows`: the partition's history rows, `grid_href`: the grid's URL."""
    recent = rows.sort_values("finished_at", ascending=False).head(RUNS_SHOWN) \
        .to_dict("records") if not rows.empty else []
    badge = (f'<span class="badge" style="background:{STATUS_COLOURS[str(summary.status)]}">'
             f'{summary.status}</span>')
    regression = regression_text(summary)
    runs = "\n".join(_run_row(row, linking) for row in recent)
    test_lines = "\n".join(_test_row(t) for t in tests)
    title = html.escape(summary.partition)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mlci: {title}</title><style>{STYLE}</style></head>
<body><div class="sub"><a href="{html.escape(grid_href)}">grid</a></div>
<h1>{title} {badge}</h1>
<div class="sub">{summary.runs} run(s) on record, as of {_when(now)}.
{f'<span class="reg">{html.escape(regression)}</span>' if regression != "-" else ""}</div>
<h2>Runs, newest first{f" (the last {RUNS_SHOWN})" if len(rows) > RUNS_SHOWN else ""}</h2>
<div class="scroll"><table class="runs"><tr><th>finished</th><th>status</th><th>attempt</th>
<th>batch</th><th>image</th><th>took</th><th>signature</th><th>links</th></tr>
{runs or '<tr><td colspan="8">no runs recorded</td></tr>'}
</table></div>
<h2>Tests ({len(tests)}), failing first</h2>
<div class="scroll"><table class="wraps tests"><tr><th>test</th><th>state</th><th>runs</th>
<th>history</th><th>latest message</th></tr>
{test_lines or '<tr><td colspan="5">no test results recorded</td></tr>'}
</table></div>
</body></html>
"""
