"""The nightly schedule: one run per applicable (config, engine) of the nightly tier.

Dagster's `build_schedule_from_partitioned_job` rejects dynamic × static partitions, so the
run requests are built here from the registry.
"""

import dagster as dg
from dagster._core.instance.types import CachingDynamicPartitionsLoader

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, partition_key
from mlci_dagster.resources.mlci import TRIGGER_TAG, MlciResource

NIGHTLY_TIER = "nightly"


def nightly_schedule(job: dg.JobDefinition, cron: str = "0 2 * * *"
                     ) -> dg.ScheduleDefinition:
    @dg.schedule(name="nightly", job=job, cron_schedule=cron,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Every nightly-tier config on every engine it applies to.")
    def nightly(context: dg.ScheduleEvaluationContext, mlci: MlciResource):
        registry = mlci.registry()
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        night = context.scheduled_execution_time.strftime("%Y-%m-%d")
        requests = []
        for config, engine in registry.partitions(tier=NIGHTLY_TIER):
            if config not in known:
                context.log.warning(f"{config}: not yet a partition (registry_sync adds it)")
                continue
            requests.append(dg.RunRequest(
                partition_key=partition_key(config, engine),
                # Run keys dedupe forever: one run per partition per night, even on a retried tick.
                run_key=f"nightly:{night}:{config}|{engine}",
                tags={TRIGGER_TAG: "schedule"},
            ))
        if not requests:
            return dg.SkipReason("no nightly-tier partitions")
        return resolve_known(requests, context.repository_def.get_job(job.name), known,
                             context.instance)

    return nightly


class KnownPartitions(CachingDynamicPartitionsLoader):
    """Answers Dagster's partition-existence checks from the config keys read once per tick.

    Dagster's own loader asks the storage once per distinct key. Its class lives in a private
    module: this depends on the pinned dagster version (pyproject.toml).
    """

    def __init__(self, instance: dg.DagsterInstance, keys: set[str]) -> None:
        super().__init__(instance)
        self.keys = keys

    def has_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> bool:
        return partition_key in self.keys


def resolve_known(
    requests: list[dg.RunRequest], job: dg.JobDefinition, known: set[str],
    instance: dg.DagsterInstance,
) -> list[dg.RunRequest]:
    """Resolves the requests' partition tags against the config partitions read once above.

    Left to Dagster, each distinct config costs a query of its own to check that its partition
    exists: 8,000 requests took tens of seconds on SQLite.
    """
    store = KnownPartitions(instance, known)
    return [r.with_resolved_tags_and_config(target_definition=job, dynamic_partitions_requests=[],
                                            dynamic_partitions_store=store)
            for r in requests]
