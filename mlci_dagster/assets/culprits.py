"""Culprit searches in the UI: the `culprit_search` asset their states are observed on, and the
`find_culprit` job that starts one by hand from the Launchpad (the culprit_search sensor then
runs it, as it runs the ones it starts). No `from __future__ import annotations` here: Dagster
reads the op's config type from its annotation."""


import dagster as dg
from pydantic import Field

from mlci_dagster.culprits.search import SearchRefused
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.searches import SEARCH_ASSET, open_search

FIND_CULPRIT_JOB = "find_culprit"

culprit_search = dg.AssetSpec(
    SEARCH_ASSET, group_name="operations", kinds={"git"},
    description="One observation per state of a culprit search (started, each rerun's result, "
                "its culprit confirmed or why it stopped), or a search refused and why.")


class FindCulpritConfig(dg.Config):
    partition: str = Field(description="The failing partition, `config|engine`.")
    good: str = Field(default="", description="A commit it passed at (default: the last "
                                                  "pass before its latest failing streak).")
    bad: str = Field(default="", description="A commit it failed at (default: the first "
                                                 "failure of that streak).")


@dg.op(description="Opens the culprit search of a partition's regression; the culprit_search "
                   "sensor runs its reruns. Fails, saying why, when there is nothing to search "
                   "or the search would pass its bounds.")
def open_culprit_search(context: dg.OpExecutionContext, config: FindCulpritConfig,
                        mlci: MlciResource) -> None:
    try:
        search, new = open_search(context.instance, mlci.registry(), mlci.home_path(),
                                  config.partition, driver="sensor", good=config.good or None,
                                  bad=config.bad or None)
    except SearchRefused as exc:
        raise dg.Failure(description=f"{config.partition}: not searched: {exc}") from None
    context.log.info(f"{search.partition}: {'opened' if new else 'already open'} search "
                     f"{search.id} over {len(search.commits)} commits, up to {search.max_runs} "
                     f"reruns, {search.width} at once")


@dg.job(name=FIND_CULPRIT_JOB, description="Bisect a failing partition's range of commits to "
                                           "the one that broke it.")
def find_culprit() -> None:
    open_culprit_search()
