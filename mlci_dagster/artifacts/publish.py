"""The published site: the grid, a page per partition and its tests, written to the artifact
store under `site/`, so that one URL (the grid's) shows the history to anyone who can reach the
store. `mlci publish` and the published_site asset (after every history update, the nightly's
among them) both call `publish`. Each page links to the others and to the evidence as the store
serves them; the partition pages are written before the grid that links to them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import pandas as pd

from mlci_dagster.artifacts.retention import SITE
from mlci_dagster.artifacts.store import ArtifactStore
from mlci_dagster.history.analysis import PartitionSummary, signature_clusters
from mlci_dagster.history.case_analysis import TestSummary
from mlci_dagster.history.grid import render_grid
from mlci_dagster.history.links import Linking
from mlci_dagster.history.pages import render_partition_page

INDEX_KEY = f"{SITE}/index.html"


def page_key(partition: str) -> str:
    return f"{SITE}/partitions/{quote(partition.replace('|', '.'), safe='')}.html"


@dataclass(frozen=True)
class Published:
    url: str  # the grid's: the one to bookmark
    pages: int
    size: int  # bytes written
    expires_s: int | None  # the links' lifetime when they are presigned; None: they last


def publish(store: ArtifactStore, table: pd.DataFrame, summaries: list[PartitionSummary],
            tests: list[TestSummary], cases: pd.DataFrame | None, linking: Linking,
            now: float) -> Published:
    """Writes the site; StoreError when the store refuses (pages already written stay, and
    link only to what exists)."""
    link = linking.artifact
    index = link(INDEX_KEY)
    by_partition = dict(tuple(table.groupby("partition"))) if not table.empty else {}
    size = 0
    for summary in summaries:
        rows = by_partition.get(summary.partition, table.iloc[0:0])
        page = render_partition_page(summary, rows,
                                     [t for t in tests if t.partition == summary.partition],
                                     linking, index, now)
        size += store.write(page_key(summary.partition), page.encode()).size
    grid = render_grid(table, summaries, now, signature_clusters(table, summaries), linking,
                       tests, cases, partition_page=lambda p: link(page_key(p)))
    size += store.write(INDEX_KEY, grid.encode()).size
    return Published(index, len(summaries) + 1, size, store.link_lifetime())
