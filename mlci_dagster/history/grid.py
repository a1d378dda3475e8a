"""A TestGrid-like HTML grid, one self-contained file: rows config × engine, columns batches (a
night, a commit, an image, an `mlci run`) aligned across rows, newest left, each headed by its
date and the image digest it tested. A cell is a run, linked to its Dagster run, lettered by its
failure signature (hover for the signature, stages and more); a regression's last pass and
first failure are marked. A partition whose pipelines report tests expands into a row per test
(failing, then flaky, then the rest; at most TESTS_SHOWN), each cell that test's result in the
partition's run of the column (hover for its message). Under the grid: the failure signatures,
and each partition's duration and metric trends drawn with axes and units."""

from __future__ import annotations

import datetime as dt
import html
import json
import string
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mlci_dagster.history.analysis import (
    PartitionSummary,
    SignatureCluster,
    cells,
    signature_clusters,
    with_run_fields,
)
from mlci_dagster.history.case_analysis import TestSummary
from mlci_dagster.history.links import NO_LINKS, Linking
from mlci_dagster.history.render import counted, regression_text, short, test_history_text, usd
from mlci_dagster.history.table import METRIC_PREFIX
from mlci_dagster.vocabulary import (
    LIFECYCLE_CANCELED,
    LIFECYCLE_PASS,
    LIFECYCLE_SKIP,
    STAGES,
    FailureKind,
    judged,
    passed,
)

COLUMNS = 30
TESTS_SHOWN = 50  # per partition: failing and flaky first; `mlci tests` lists every one
TEST_COLOURS = {"pass": "#2da44e", "fail": "#cf222e", "error": "#bc4c00", "skip": "#afb8c1"}
# A cell's colour: a pass, a failure by its kind, or a run that was no verdict (refused before
# it began, interrupted before it finished).
COLOURS = {LIFECYCLE_PASS: "#2da44e", FailureKind.PRODUCT: "#cf222e",
           FailureKind.TIMEOUT: "#bc4c00", FailureKind.CONFIG: "#0969da",
           FailureKind.INFRA: "#8250df", LIFECYCLE_SKIP: "#afb8c1",
           LIFECYCLE_CANCELED: "#6e7781"}
STATUS_COLOURS = {"PASS": "#2da44e", "FLAKY": "#d4a72c", "FAILING": "#cf222e",
                  "BROKEN": "#8250df", "STALE": "#8c959f", "PENDING": "#d0d7de"}

STYLE = """
body { font: 13px system-ui, sans-serif; margin: 24px; color: #1f2328; }
.scroll { overflow-x: auto; max-width: 100%; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 24px 0 8px; }
.sub { color: #59636e; margin-bottom: 12px; }
table { border-collapse: collapse; } td, th { padding: 2px 4px; white-space: nowrap; }
th { text-align: left; font-weight: 600; color: #59636e; }
th.batch { font-weight: 400; font-size: 10px; text-align: center; line-height: 1.25;
           font-family: ui-monospace, monospace; }
td.name { font-family: ui-monospace, monospace; padding-right: 8px; }
td.slot { text-align: center; padding: 1px; }
.badge { color: white; border-radius: 3px; padding: 1px 6px; font-size: 11px; font-weight: 600; }
.cell { display: inline-block; width: 20px; height: 18px; border-radius: 2px;
        vertical-align: middle; color: white; font: 600 11px/18px ui-monospace, monospace;
        text-align: center; text-decoration: none; box-sizing: border-box; }
.cell:hover { outline: 2px solid #1f2328; }
.has-pop { position: relative; display: inline-block; }
.pop { display: none; position: absolute; top: -1px; left: 100%; z-index: 2; background: #fff;
  border: 1px solid #d0d7de; border-radius: 4px; padding: 0 6px; line-height: 18px;
  white-space: nowrap; }  /* beside the cell: a scrolling table clips what hangs below it */
.has-pop:hover .pop, .has-pop:focus-within .pop { display: block; }
.cell.last-pass { border: 2px solid #1f2328; } .cell.first-fail { border: 2px dashed #1f2328; }
.none { display: inline-block; width: 20px; height: 18px; background: #f6f8fa; }
.legend span { margin-right: 12px; } .reg { color: #cf222e; font-size: 12px; }
.sig { font-family: ui-monospace, monospace; }
table.wraps td { white-space: normal; overflow-wrap: anywhere; }
table.wraps td.name, table.wraps td.id { white-space: nowrap; }
.trend { display: inline-block; margin: 0 16px 12px 0; vertical-align: top; }
.trend .t { font-size: 11px; color: #59636e; }
button.tg { font: 11px system-ui, sans-serif; border: 1px solid #d0d7de; border-radius: 3px;
            background: #f6f8fa; cursor: pointer; padding: 0 4px; margin-left: 4px; }
tr.test td.name { font-size: 11px; padding-left: 16px; max-width: 520px; overflow: hidden;
                  text-overflow: ellipsis; }
tr.test .cell { width: 12px; height: 12px; } tr.test td.reg { color: #59636e; }
"""
SCRIPT = """function tog(id, button) { let open = false;
  document.querySelectorAll('tr.' + id).forEach(r => { r.hidden = !r.hidden; open = !r.hidden; });
  button.textContent = (open ? '\u25be' : '\u25b8') + button.textContent.slice(1); }"""


def batch_keys(table: pd.DataFrame) -> pd.Series:
    """Each row's batch, or for a row recorded before batches: its trigger and UTC day."""
    day = pd.to_datetime(table["started_at"].astype(float), unit="s", utc=True)
    derived = table["trigger"].astype(str) + " " + day.dt.strftime("%Y-%m-%d")
    recorded = table["batch"].map(bool)
    return table["batch"].where(recorded, derived)


def batch_columns(table: pd.DataFrame, limit: int = COLUMNS) -> list[dict[str, Any]]:
    """The newest `limit` batches, newest first: key, first start, the image most tested."""
    columns = []
    for key, rows in table.groupby("_batch"):
        digests = Counter(d for d in rows["image_digest"] if d)
        columns.append({"key": str(key), "started": float(rows["started_at"].min()),
                        "digest": digests.most_common(1)[0][0] if digests else ""})
    columns.sort(key=lambda c: c["started"], reverse=True)
    return columns[:limit]


def signature_letters(clusters: list[SignatureCluster], table: pd.DataFrame) -> dict[str, str]:
    """A letter per signature: those failing now first (the clusters' order), then the rest."""
    order = [c.signature for c in clusters]
    order += [s for s in table["signature"].dropna().unique() if s not in order]
    letters = string.ascii_uppercase + string.ascii_lowercase + string.digits
    return {signature: letters[i] if i < len(letters) else "*"
            for i, signature in enumerate(order)}


def column_times(columns: list[dict[str, Any]]) -> list[str]:
    """Each column's time of day (UTC): `HH:MM`, and `HH:MM:SS` where two columns share a
    minute (batches started a minute apart would otherwise look alike)."""
    moments = [dt.datetime.fromtimestamp(c["started"], dt.UTC) for c in columns]
    minutes = Counter(f"{m:%Y-%m-%d %H:%M}" for m in moments)
    return [f"{m:%H:%M:%S}" if minutes[f"{m:%Y-%m-%d %H:%M}"] > 1 else f"{m:%H:%M}"
            for m in moments]


def image_label(image: str) -> str:
    """A column's image, narrow: a digest's first 7 hex characters, a reference's last
    component clipped to 10 characters (the whole is in the column's title)."""
    label = short(image, 7)
    return label if len(label) <= 10 else label[:9] + "…"


def utc(moment: float) -> str:
    return f"{dt.datetime.fromtimestamp(moment, dt.UTC):%Y-%m-%d %H:%M}Z"


def colour_of(row: dict[str, Any]) -> str:
    """A run's colour: a pass, a failure by its kind, or a run that was no verdict."""
    status = row["status"]
    return COLOURS[LIFECYCLE_PASS] if passed(status) else COLOURS.get(status) \
        if not judged(status) else COLOURS.get(row["failure_kind"] or "",
                                               COLOURS[FailureKind.PRODUCT])


def background(attempts: list[dict[str, Any]]) -> str:
    """One colour, or a cell's deflake attempts side by side, oldest left."""
    if len(attempts) == 1:
        return colour_of(attempts[0])
    width = 100 / len(attempts)
    stops = ", ".join(f"{colour_of(a)} {i * width:.0f}% {(i + 1) * width:.0f}%"
                      for i, a in enumerate(attempts))
    return f"linear-gradient(to right, {stops})"


def _cell(row: dict[str, Any], letter: str, mark: str, linking: Linking, more: int,
          attempts: list[dict[str, Any]] = ()) -> str:
    """`row`: the run shown; `attempts`: its cell's deflake attempts, oldest first, it last.
    The cell links to its Dagster run; a failure's log and debug bundle in the artifact store
    open from the box shown under it on hover."""
    attempts = list(attempts) or [row]
    status = row["status"]
    kind = row["failure_kind"] or ""
    cost = row.get("cost_usd")
    when = dt.datetime.fromtimestamp(row["finished_at"], dt.UTC).strftime("%Y-%m-%d %H:%M")
    stages = json.loads(row["stages"]) if row["stages"] else {}
    signature = row.get("signature_text")
    title = "\n".join(line for line in [
        f"{status}" + (f" ({kind})" if kind else ""),
        f"signature {row['signature']}: {signature}" if signature else "",
        f"{when}Z, {row['duration_s']:.1f}s, {row['trigger']}"
        + (f", ${cost:.4f}" if isinstance(cost, float) and cost == cost else ""),
        f"image {short(row['image_digest'])}, config {row['config_id']}",
        # In lifecycle order: the event log may hand the record's mapping back sorted.
        "stages: " + ", ".join(f"{stage} {stages[stage]}" for stage in STAGES
                               if stage in stages),
        f"log {row['log_ref']}" if row.get("log_ref") else "",
        f"debug bundle {row['debug_bundle']}" if row.get("debug_bundle") else "",
        {"last-pass": "the last pass before the regression",
         "first-fail": "the first failure of the regression"}.get(mark, ""),
        *([f"attempt {i}: {a['status']}, run {a['run_id']}"
           for i, a in enumerate(attempts, start=1)] if len(attempts) > 1 else []),
        "flaky: failed, then passed on rerun" if len(attempts) > 1 and passed(status) else "",
        f"{more} more run(s) in this batch" if more else "",
        f"run {row['run_id']}",
    ] if line)
    links = linking.of_row(row)
    tag, link = ("a", f' href="{html.escape(links.run)}"') if links.run else ("span", "")
    cell = (f'<{tag} class="cell {mark}"{link} style="background:{background(attempts)}" '
            f'title="{html.escape(title)}">{html.escape(letter)}</{tag}>')
    evidence = [f'<a href="{html.escape(url)}">{name}</a>' for name, url in (
        ("log", links.log), ("debug bundle", links.bundle)) if url and not passed(status)]
    return (f'<span class="has-pop">{cell}<span class="pop">{" · ".join(evidence)}</span>'
            '</span>') if evidence else cell


def signature_rows(table: pd.DataFrame, columns: list[dict[str, Any]], letters: dict[str, str],
                   clusters: list[SignatureCluster]) -> str:
    """A row per signature in the grid's columns: its letter and id, how many runs and which
    partitions it failed, whether partitions fail with it now (and since when), its text."""
    if table.empty or not columns:
        return ""
    shown = table[table["_batch"].isin({c["key"] for c in columns})]
    now = {c.signature: c for c in clusters}
    rows = []
    for signature, runs in shown.dropna(subset=["signature"]).groupby("signature"):
        cluster = now.get(signature)
        state = (f"failing now in {len(cluster.partitions)}, since "
                 f"{utc(cluster.first_seen['finished_at'])}, image "
                 f"{html.escape(short(cluster.first_seen['image_digest']))}"
                 if cluster else "not failing now")
        rows.append((letters.get(signature, ""),
                     f'<tr><td class="sig"><b>{letters.get(signature, "")}</b></td>'
                     f'<td class="sig id">{signature}</td><td>{len(runs)} run(s) of '
                     f'{html.escape(", ".join(sorted(runs["partition"].unique())))}</td>'
                     f'<td>{state}</td><td class="sig">'
                     f'{html.escape(str(runs["signature_text"].iloc[-1]))}</td></tr>'))
    return "".join(row for _, row in sorted(rows))


def _marks(summary: PartitionSummary) -> dict[str, str]:
    """run id -> `last-pass` or `first-fail`, for a partition with a regression range."""
    regression = summary.regression or {}
    marks = {}
    for key, mark in (("last_pass", "last-pass"), ("first_fail", "first-fail")):
        run = regression.get(key) or {}
        if run.get("run_id"):
            marks[run["run_id"]] = mark
    return marks


def trend_chart(values: list[float], unit: str, title: str, width: int = 240,
                height: int = 80) -> str:
    """A line chart with a y axis (its range in `unit`) and an x axis of runs, oldest left."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    if high == low:
        low, high = low * 0.9 if low else -1.0, high * 1.1 if high else 1.0
    left, right, top, bottom = 44, 8, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(v: float) -> float:
        return top + plot_h - (v - low) / (high - low) * plot_h

    step = plot_w / (len(values) - 1)
    points = " ".join(f"{left + i * step:.1f},{y(v):.1f}" for i, v in enumerate(values))
    ticks = "".join(
        f'<line x1="{left - 3}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
        f'stroke="#d0d7de" stroke-width="0.5"/><text x="{left - 5}" y="{y(v) + 3:.1f}" '
        f'text-anchor="end" font-size="9" fill="#59636e">{v:.3g}{unit}</text>'
        for v in (low, (low + high) / 2, high))
    last_x, last_y = left + (len(values) - 1) * step, y(values[-1])
    return (
        f'<div class="trend"><div class="t">{html.escape(title)}</div>'
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'{ticks}<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#59636e"/>'
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="#59636e"/><polyline fill="none" stroke="#0969da" stroke-width="1.5" '
        f'points="{points}"/><circle cx="{last_x:.1f}" cy="{last_y:.1f}" r="2.5" '
        f'fill="#0969da"/><text x="{left}" y="{height - 6}" font-size="9" fill="#59636e">'
        f'run 1</text><text x="{left + plot_w}" y="{height - 6}" font-size="9" '
        f'text-anchor="end" fill="#59636e">run {len(values)} (latest)</text></svg></div>')


def trends(rows: pd.DataFrame) -> str:
    """The partition's lifecycle duration (seconds) and each declared metric, over its runs."""
    ran = rows[rows["status"].map(judged)].tail(COLUMNS)
    charts = [trend_chart([float(v) for v in ran["duration_s"]], "s", "duration, seconds")]
    for column in [c for c in rows.columns if c.startswith(METRIC_PREFIX)]:
        values = [float(v) for v in pd.to_numeric(ran[column], errors="coerce").dropna()]
        _, name, way = column.split(":")
        charts.append(trend_chart(values, "", f"{name} ({way} is better)"))
    return "".join(charts)


def test_rows(row_id: str, tests: list[TestSummary], runs: dict[str, int], cases: pd.DataFrame,
              columns: list[dict[str, Any]], width: int) -> tuple[str, str]:
    """A partition's test rows (hidden until its button is pressed) and that button: a row per
    test, at most TESTS_SHOWN, a cell per column with the test's result in the run shown there.
    `runs`: the column's batch -> the storage id of the partition's run shown in it."""
    if not tests:
        return "", ""
    shown = tests[:TESTS_SHOWN]
    ids = {t.test_id for t in shown}
    rows = cases[cases["storage_id"].isin(list(runs.values()))]
    rows = rows[rows["test_id"].isin(list(ids))]
    results = {(t, s): (st, m) for t, s, st, m in zip(
        rows["test_id"].astype(str), rows["storage_id"], rows["status"].astype(str),
        rows["message"].astype(str), strict=True)}
    lines = []
    for test in shown:
        slots = []
        for column in columns:
            found = results.get((test.test_id, runs.get(column["key"], -1)))
            if found is None:
                slots.append('<td class="slot"><span class="none"></span></td>')
                continue
            status, message = found
            title = status + (f": {message}" if message else "")
            slots.append(f'<td class="slot"><span class="cell" style="background:'
                         f'{TEST_COLOURS.get(status, "#afb8c1")}" title="{html.escape(title)}">'
                         '</span></td>')
        # The name first, whole if it fits: the suite and class are in its title.
        name = test.test_id.rsplit(" :: ", 1)[-1]
        lines.append(f'<tr class="test {row_id}" hidden><td class="name" colspan="2" '
                     f'title="{html.escape(test.test_id)}">{html.escape(name)}</td>'
                     f'<td>{html.escape(str(test.state))}</td>{"".join(slots)}'
                     f'<td class="reg" colspan="{width}">'
                     f'{html.escape(test_history_text(test))}</td></tr>')
    if len(tests) > len(shown):
        lines.append(f'<tr class="test {row_id}" hidden><td colspan="3" class="name">... and '
                     f'{len(tests) - len(shown)} more: <code>mlci tests</code></td></tr>')
    failing = sum(1 for t in tests if str(t.state) == "failing")
    label = f"{counted(len(tests), 'test')}" + (f", {failing} failing" if failing else "")
    button = f'<button class="tg" onclick="tog(\'{row_id}\', this)">\u25b8 {label}</button>'
    return "\n" + "\n".join(lines), button


def render_grid(table: pd.DataFrame, summaries: list[PartitionSummary], now: float,
                clusters: list[SignatureCluster] = (), linking: Linking = NO_LINKS,
                tests: list[TestSummary] = (), cases: pd.DataFrame | None = None,
                partition_page: Callable[[str], str] | None = None) -> str:
    """The grid page; `partition_page` (a partition -> its page's URL) links each partition's
    name to a page of its own (the published site's)."""
    table = with_run_fields(table) if not table.empty else table
    if not table.empty:
        table = table.assign(_batch=batch_keys(table), _cell=cells(table))
    columns = batch_columns(table) if not table.empty else []
    letters = signature_letters(list(clusters), table) if not table.empty else {}
    by_partition = {p: rows.sort_values("finished_at") for p, rows in table.groupby("partition")} \
        if not table.empty else {}
    header = "".join(
        f'<th class="batch" title="{html.escape(c["key"])}'
        f'{html.escape(chr(10) + "image " + c["digest"]) if c["digest"] else ""}">'
        f'{dt.datetime.fromtimestamp(c["started"], dt.UTC):%m-%d}<br>{time_of_day}<br>'
        f'{html.escape(image_label(c["digest"])) if c["digest"] else "&nbsp;"}</th>'
        for c, time_of_day in zip(columns, column_times(columns), strict=True))
    # A cost column only where something costs: local and Kubernetes sandboxes are free.
    costed = any(s.cost_usd for s in summaries)
    tests_of: dict[str, list[TestSummary]] = {}
    for test in tests:  # already failing first, then flaky, then the rest
        tests_of.setdefault(test.partition, []).append(test)
    lines, charts = [], []
    for number, s in enumerate(summaries):
        rows = by_partition.get(s.partition)
        marks = _marks(s)
        # The partition's latest run in each batch, and how many it had there.
        latest = {} if rows is None else {
            row["_batch"]: row for row in rows.drop_duplicates("_batch", keep="last")
            .to_dict("records")}
        runs = {} if rows is None else rows["_batch"].value_counts().to_dict()
        cells_of: dict[tuple[str, str], list[dict[str, Any]]] = {}
        retried = [] if rows is None else rows[rows.duplicated(["_batch", "_cell"], keep=False)]
        for row in [] if rows is None else retried.to_dict("records"):
            cells_of.setdefault((row["_batch"], row["_cell"]), []).append(row)
        slots = []
        for column in columns:
            row = latest.get(column["key"])
            if row is None:
                slots.append('<td class="slot"><span class="none"></span></td>')
                continue
            letter = letters.get(row["signature"] or "", "")
            attempts = cells_of.get((column["key"], row["_cell"]), [row])
            cell = _cell(row, letter, marks.get(row["run_id"], ""), linking,
                         runs[column["key"]] - len(attempts), attempts)
            slots.append(f'<td class="slot">{cell}</td>')
        regression = regression_text(s)
        badge = (f'<span class="badge" style="background:{STATUS_COLOURS[str(s.status)]}">'
                 f'{s.status}</span>')
        shown_runs = {key: int(row["storage_id"]) for key, row in latest.items()}
        below, button = test_rows(f"p{number}", tests_of.get(s.partition, []), shown_runs,
                                  cases, columns, 2 if costed else 1) \
            if cases is not None else ("", "")
        name = html.escape(s.config)
        if partition_page is not None:
            name = f'<a href="{html.escape(partition_page(s.partition))}">{name}</a>'
        lines.append(f'<tr><td class="name">{name}</td>'
                     f'<td class="name">{html.escape(s.engine)}{button}</td><td>{badge}</td>'
                     f'{"".join(slots)}<td class="reg">'
                     f'{html.escape(regression) if regression != "-" else ""}</td>'
                     + (f'<td>{usd(s.cost_usd) if s.cost_usd else ""}</td>' if costed else "")
                     + '</tr>' + below)
        if rows is not None and (chart := trends(rows)):
            charts.append(f'<tr><td class="name">{html.escape(s.partition)}</td>'
                          f'<td>{chart}</td></tr>')
    signatures = signature_rows(table, columns, letters, list(clusters))
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d %H:%M")
    legend = "".join(f'<span><span class="cell" style="background:{c}"></span> {k}</span>'
                     for k, c in COLOURS.items())
    legend += ('<span><span class="cell last-pass" style="background:#2da44e"></span> last '
               'pass</span><span><span class="cell first-fail" style="background:#cf222e">'
               '</span> first failure</span>')
    flake = background([{"status": "fail-pipeline_runs", "failure_kind": FailureKind.PRODUCT},
                        {"status": LIFECYCLE_PASS}])
    legend += (f'<span><span class="cell" style="background:{flake}"></span> failed, passed on '
               "rerun (a cell's attempts, oldest left)</span>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mlci grid</title><style>{STYLE}</style>
<script>{SCRIPT}</script></head>
<body><h1>mlci-dagster: lifecycle grid</h1>
<div class="sub">{counted(len(summaries), "partition")}, {counted(len(table), "result")},
{counted(len(columns), "batch")}, as of {stamp}Z. Columns are batches (a night, a commit, an
image, an <code>mlci run</code>), newest left, headed by date and time (UTC) and the image they
tested; a cell links to its Dagster run, its letter names its failure signature; hover for the
rest, and for a failure's log and debug bundle.</div>
<div class="legend">{legend}</div><br>
<div class="scroll"><table><tr><th>config</th><th>engine</th><th>status</th>{header}
<th>regression</th>{'<th>cost</th>' if costed else ''}</tr>
{chr(10).join(lines)}
</table></div>
{f'<h2>Failure signatures in view</h2><div class="scroll"><table class="wraps">{signatures}'
 '</table></div>' if signatures else ''}
<h2>Trends</h2>{f'<div class="scroll"><table class="wraps">{"".join(charts)}</table></div>'
                 if charts else '<div class="sub">not enough runs yet</div>'}
</body></html>
"""


def write_grid(table: pd.DataFrame, summaries: list[PartitionSummary], directory: Path,
               tests: list[TestSummary] = (), cases: pd.DataFrame | None = None,
               linking: Linking = NO_LINKS) -> Path:
    """The grid page into `directory`: what the grid_report asset and `mlci report --html`
    both write, its cells linking as `linking` says (the Dagster UI, the artifact store); with
    the test history's `cases` and their `tests` summaries, each partition expands into its
    tests."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "grid.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_grid(table, summaries, time.time(),
                               signature_clusters(table, summaries), linking,
                               list(tests), cases))
    tmp.replace(path)
    return path
