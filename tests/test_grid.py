"""The grid page, parsed back: columns are batches aligned across rows and headed by date and
digest, cells link to their Dagster runs and carry their signature, a regression's ends are
marked, and trends are drawn with axes and units."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from mlci_dagster.history.analysis import analyze, signature_clusters
from mlci_dagster.history.grid import render_grid
from mlci_dagster.history.render import report_table
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.registry.models import HistorySettings
from tests.conftest import result_record

NIGHT = 1_780_000_000.0  # 2026-05-28 20:26:40Z


def record(partition: str, status: str, night: int, digest: str, summary: str = "",
           batch: str | None = None):
    found = result_record(partition, status, NIGHT + night * 86_400, digest=digest,
                          duration=10.0 + night)
    return found.model_copy(update={
        "batch": batch if batch is not None else f"nightly night-{night}",
        "error_summary": summary, "run_id": f"run-{partition}-{night}"})


class Grid(HTMLParser):
    """The grid table: header cells, and per row its slots (a cell's attributes, or None)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.rows: list[list[dict[str, str] | None]] = []
        self._in_header = False
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "br" and self._in_header:
            self._text += "|"
        if tag == "tr":
            self.rows.append([])
        if tag == "th" and found.get("class") == "batch":
            self._in_header, self._text = True, ""
        if tag in ("a", "span") and "cell" in (found.get("class") or "") and "title" in found:
            self.rows[-1].append({**found, "letter": ""})
        if tag == "span" and found.get("class") == "none":
            self.rows[-1].append(None)

    def handle_endtag(self, tag: str) -> None:
        if tag == "th" and self._in_header:
            self.headers.append(self._text)
            self._in_header = False

    def handle_data(self, data: str) -> None:
        if self._in_header:
            self._text += data
        elif self.rows and self.rows[-1] and self.rows[-1][-1] is not None and \
                data.strip() and not self.rows[-1][-1]["letter"]:
            self.rows[-1][-1]["letter"] = data.strip()


def test_columns_are_batches_aligned_across_rows_with_links_signatures_and_marks():
    broken = "Traceback (most recent call last):\nValueError: 7 nulls in 'age'"
    records = [
        record("a|e1", "pass", 0, "sha256:aaaa1111"),
        record("b|e1", "pass", 0, "sha256:aaaa1111"),
        record("a|e1", "pass", 1, "sha256:aaaa1111"),  # b did not run on night 1
        record("a|e1", "fail-pipeline_runs", 2, "sha256:bbbb2222", broken),
        record("b|e1", "fail-pipeline_runs", 2, "sha256:bbbb2222",
               broken.replace("7 nulls", "12 nulls")),
    ]
    table = append_rows(None, [record_to_row(r, i + 1) for i, r in enumerate(records)])
    summaries = analyze(table, ["a|e1", "b|e1"], HistorySettings(), NIGHT + 3 * 86_400)
    clusters = signature_clusters(table, summaries)

    page = render_grid(table, summaries, NIGHT + 3 * 86_400, clusters, "http://dagster.test")
    grid = Grid()
    grid.feed(page)
    a, b = (row for row in grid.rows if len(row) == 3)

    # Newest batch left, headed by its date, time and the image it tested.
    assert grid.headers == ["05-30|20:26|bbbb222", "05-29|20:26|aaaa111",
                            "05-28|20:26|aaaa111"]
    assert [c["href"] if c else None for c in a] == [
        "http://dagster.test/runs/run-a|e1-2", "http://dagster.test/runs/run-a|e1-1",
        "http://dagster.test/runs/run-a|e1-0"]
    assert b[1] is None and b[0]["href"].endswith("run-b|e1-2")  # aligned: a gap, not a shift
    # One cause in both partitions: one signature, its letter in both cells, its text on hover.
    [cluster] = clusters
    assert a[0]["letter"] == b[0]["letter"] == "A"
    assert f"signature {cluster.signature}: pipeline_runs/product: ValueError: <n> nulls in" \
           in a[0]["title"]
    # The regression: the last pass and the first failure are marked.
    assert "first-fail" in a[0]["class"] and "last-pass" in a[1]["class"]
    assert a[1]["title"].startswith("pass\n")  # no failure kind shown for a pass (not "nan")
    assert a[0]["title"].startswith("fail-pipeline_runs (product)\n")
    assert "the first failure of the regression" in a[0]["title"]
    # Trends with axes and units.
    assert re.search(r'<text[^>]*>\d+(\.\d+)?s</text>', page)
    assert "duration, seconds" in page and "run 3 (latest)" in page
    assert f"{cluster.signature}</td><td>2 run(s) of a|e1, b|e1" in page


def test_a_batch_with_refused_runs_renders_everywhere_with_no_nan():
    """A refused run (skip) has no image digest, failure kind or signature: pandas would keep
    those gaps as NaN beside the strings of the runs that ran, which string code trips on."""
    records = [
        record("a|e1", "pass", 0, "sha256:aaaa1111"),
        record("a|e1", "fail-pipeline_runs", 1, "sha256:bbbb2222", "ValueError: broke"),
        record("b|e1", "skip", 1, "").model_copy(update={"image_digest": None}),
    ]
    table = append_rows(None, [record_to_row(r, i + 1) for i, r in enumerate(records)])
    # The table as a later update extends it (its stored part, then one more refusal).
    table = append_rows(table, [record_to_row(record("b|e1", "skip", 2, "").model_copy(
        update={"image_digest": None}), 4)])
    assert all(value is None or isinstance(value, str)
               for column in ("image_digest", "failure_kind", "signature", "batch")
               for value in table[column])
    summaries = analyze(table, ["a|e1", "b|e1"], HistorySettings(), NIGHT + 3 * 86_400)
    clusters = signature_clusters(table, summaries)

    page = render_grid(table, summaries, NIGHT + 3 * 86_400, clusters, "http://dagster.test")
    text = report_table(summaries, NIGHT + 3 * 86_400)

    grid = Grid()
    grid.feed(page)
    b = next(row for row in grid.rows if len(row) == 3 and row[0] and "b|e1" in row[0]["href"])
    assert b[0]["title"].startswith("skip\n") and "image -," in b[0]["title"]
    assert "nan" not in page.lower() and "nan" not in text.lower()
