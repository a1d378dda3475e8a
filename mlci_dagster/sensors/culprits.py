"""The culprit_search sensor: opens a search when a partition first fails at a commit after a
pass at an older one (culprit_search.automatic), and advances every search it drives: each
tick reads the reruns' results, records the search's new state, and requests the next reruns
as lifecycle runs of the partition tagged with the search (run keys: each rerun once)."""

from __future__ import annotations

import json
from itertools import islice

import dagster as dg

from mlci_dagster.assets.partitions import multi_partition_key
from mlci_dagster.culprits.search import SearchRefused
from mlci_dagster.event_log import new_results
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.searches import (
    observation,
    open_search,
    open_searches,
    refusal_observation,
    rerun_key,
    rerun_tags,
    starts_regression,
    step,
)
from mlci_dagster.sensors.image_build import registry_or_skip, results_after
from mlci_dagster.vocabulary import split_partition_key

RESULTS_PER_TICK = 500
DRIVER = "sensor"


def culprit_search_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(name="culprit_search", job=job, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Bisects a regression whose range spans several commits: reruns "
                           "the failing partition at commits of the range (k at once, as its "
                           "pool allows), confirms the culprit by a rerun of it and its parent, "
                           "and records each state as a culprit_search observation.")
    def culprit_search(context: dg.SensorEvaluationContext, mlci: MlciResource
                       ) -> dg.SensorResult | dg.SkipReason:
        registry = registry_or_skip(mlci)
        if isinstance(registry, dg.SkipReason):
            return registry
        instance = context.instance
        after = results_after(context)
        if isinstance(after, dg.SensorResult):
            return after
        settings = registry.settings.culprit_search
        automatic = settings.automatic and registry.settings.repository is not None
        starting = {}
        for storage_id, record in islice(new_results(instance, after), RESULTS_PER_TICK):
            after = storage_id
            if automatic and starts_regression(instance, storage_id, record):
                starting[record.partition] = record
        events: list[dg.AssetObservation] = []
        for partition, record in starting.items():
            try:
                search, new = open_search(instance, registry, mlci.home_path(), partition,
                                          driver=DRIVER)
            except SearchRefused as exc:
                context.log.info(f"{partition}: not searched: {exc}")
                events.append(refusal_observation(partition, str(exc), run_id=record.run_id))
                continue
            if new:
                context.log.info(f"{partition}: searching {len(search.commits)} commits for the "
                                 f"culprit of {search.signature_text} ({search.id})")
        requests = []
        for search, recorded in open_searches(instance, DRIVER):
            done = step(instance, search)
            summary = done.summary()
            if any(summary[k] != recorded[k] for k in ("state", "reruns")):
                events.append(observation(search, done))
                context.log.info(f"{search.partition} ({search.id}): {summary['text']}")
            config, engine = split_partition_key(search.partition)
            requests += [dg.RunRequest(partition_key=multi_partition_key(config, engine),
                                       run_key=rerun_key(search, rerun),
                                       tags=rerun_tags(search, rerun))
                         for rerun in done.next]
        return dg.SensorResult(run_requests=requests, asset_events=events,
                               cursor=json.dumps({"results_after": after}),
                               skip_reason=None if requests or events else "no search to advance")

    return culprit_search
