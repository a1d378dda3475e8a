"""The nightly schedule: one run per applicable (config, engine) of the nightly tier.

Dagster's `build_schedule_from_partitioned_job` rejects dynamic × static partitions, so the
run requests are built here from the registry.
"""

import dagster as dg

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
        return requests or dg.SkipReason("no nightly-tier partitions")

    return nightly
