"""The grid page, parsed back: columns are batches aligned across rows and headed by date and
digest, cells link to their Dagster runs and carry their signature, a regression's ends are
marked, and trends are drawn with axes and units."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from mlci_dagster.history.analysis import analyze, signature_clusters
from mlci_dagster.history.grid import render_grid
from mlci_dagster.history.links import Linking
from mlci_dagster.history.render import report_table
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.registry.models import HistorySettings
from tests.support.runs import result_record
from tests.support.services import CHROMIUM, require

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

    page = render_grid(table, summaries, NIGHT + 3 * 86_400, clusters,
                       Linking("http://dagster.test"))
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

    page = render_grid(table, summaries, NIGHT + 3 * 86_400, clusters,
                       Linking("http://dagster.test"))
    text = report_table(summaries, NIGHT + 3 * 86_400)

    grid = Grid()
    grid.feed(page)
    b = next(row for row in grid.rows if len(row) == 3 and row[0] and "b|e1" in row[0]["href"])
    assert b[0]["title"].startswith("skip\n") and "image -," in b[0]["title"]
    assert "nan" not in page.lower() and "nan" not in text.lower()


def page_text(page: str) -> str:
    """The page's words as a reader sees them: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())


def grid_of(records, now: float = NIGHT + 40 * 86_400) -> tuple[str, Grid]:
    table = append_rows(None, [record_to_row(r, i + 1) for i, r in enumerate(records)])
    partitions = sorted({r.partition for r in records})
    summaries = analyze(table, partitions, HistorySettings(), now)
    page = render_grid(table, summaries, now, signature_clusters(table, summaries),
                       Linking("http://dagster.test"))
    grid = Grid()
    grid.feed(page)
    return page, grid


def test_batches_started_within_one_minute_are_told_apart_by_their_seconds():
    batches = [record("a|e1", "pass", 0, "sha256:aaaa1111", batch=f"mlci run {i}")
               .model_copy(update={"started_at": NIGHT + 5 * i, "finished_at": NIGHT + 5 * i + 4,
                                   "run_id": f"run-{i}"}) for i in range(3)]
    alone = record("a|e1", "pass", 1, "sha256:aaaa1111")  # a day later, its minute its own

    _, grid = grid_of([*batches, alone])

    assert grid.headers == ["05-29|20:26|aaaa111", "05-28|20:26:50|aaaa111",
                            "05-28|20:26:45|aaaa111", "05-28|20:26:40|aaaa111"]


def test_an_image_recorded_as_a_tag_reference_is_shown_by_its_name():
    """A tag no declared registry resolves is recorded as written; its digest part would be
    `1`, so the views show the reference's name instead."""
    records = [record("a|e1", "pass", 0, "registry.test/app:1"),
               record("a|e1", "fail-pipeline_runs", 1, "registry.test/app:2", "ValueError: x")]

    page, grid = grid_of(records)

    assert [h.split("|")[-1] for h in grid.headers] == ["app:2", "app:1"]
    [[fail, ok]] = [row for row in grid.rows if len(row) == 2]
    assert "image app:2, config c1" in fail["title"] and "image app:1," in ok["title"]
    assert "app:1→app:2 (the product changed)" in page_text(page)
    assert "image 1" not in page_text(page) and "1→2" not in page_text(page)


def test_the_cost_column_is_shown_only_when_a_partition_costs_something():
    free = [record("a|e1", "pass", 0, "sha256:aaaa1111")]
    billed = [free[0].model_copy(update={"cost_usd": 0.25})]

    free_page, _ = grid_of(free)
    billed_page, _ = grid_of(billed)

    assert re.findall(r"<th>(\w+)</th>", free_page) == ["config", "engine", "status",
                                                        "regression"]
    assert re.findall(r"<th>(\w+)</th>", billed_page)[-1] == "cost"
    assert "$0.2500" in page_text(billed_page)


def test_one_of_each_is_said_in_the_singular():
    page, _ = grid_of([record("a|e1", "pass", 0, "sha256:aaaa1111")])

    assert "1 partition, 1 result, 1 batch, as of" in page_text(page)


def wide_history() -> list:
    """A month of nights on six partitions, failing the last week with a long error line."""
    error = ("RuntimeError: CUDA error: an illegal memory access was encountered while the "
             "trainer synchronised gradients across the data parallel group of the pipeline "
             "stage; compile with TORCH_USE_CUDA_DSA to enable device-side assertions")
    return [record(f"{config}|{engine}", "pass" if night < 23 else "fail-pipeline_runs", night,
                   f"sha256:{night:04d}abcd{night:04d}", error if night >= 23 else "")
            for night in range(30) for config in ("python-train", "ray-train", "spark-features")
            for engine in ("sqlite", "postgres")]


def test_the_page_fits_a_900_px_window_and_the_grid_scrolls_in_its_own_box(tmp_path):
    """In headless Chromium at 900 px wide: nothing overflows the window; the 30 columns
    scroll inside the grid's box, and the long failure signature wraps."""
    from mlci_dagster.common.chromium import find_chromium, launch_args

    require(CHROMIUM)
    chromium = find_chromium()
    from playwright.sync_api import sync_playwright

    page_html, _ = grid_of(wide_history())
    (tmp_path / "grid.html").write_text(page_html)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=launch_args())
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.goto((tmp_path / "grid.html").as_uri())
        page_width = page.evaluate("document.documentElement.scrollWidth")
        box = page.evaluate("(() => { const box = document.querySelector('.scroll'); "
                            "return [box.scrollWidth, box.clientWidth]; })()")
        page.screenshot(path=str(tmp_path / "grid-900.png"), full_page=True)
        browser.close()

    assert page_width <= 900, f"the page is {page_width} px wide in a 900 px window"
    assert box[0] > box[1]  # the grid is wider than its box, and scrolls there
    assert (tmp_path / "grid-900.png").stat().st_size > 0
