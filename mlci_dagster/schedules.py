"""The nightly schedule: one run per applicable (config, engine) of the nightly tier.

Dagster's `build_schedule_from_partitioned_job` rejects dynamic × static partitions, so the
run requests are built here from the registry.
"""

import dagster as dg

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, multi_partition_key
from mlci_dagster.commits import (
    BRANCH_PREFIX,
    RUNS_TAG,
    SHA_TAG,
    TIER_TAG,
    CommitError,
    repository_url,
    watched_refs,
)
from mlci_dagster.compat import resolve_run_requests
from mlci_dagster.registry import Registry
from mlci_dagster.resources.mlci import TRIGGER_TAG, MlciResource
from mlci_dagster.vocabulary import partition_key

NIGHTLY_TIER = "nightly"
NIGHTLY_CRON = "0 2 * * *"  # UTC; `mlci cost` projects the month from it


def default_branch_head(registry: Registry, log: dg.DagsterLogManager) -> str | None:
    """The SHA the first watched branch of mlci.yaml's repository points at: what the night's
    run set is tagged with, so that a fully passing night qualifies it. None without one."""
    spec = registry.settings.repository
    if spec is None:
        return None
    try:
        return watched_refs(repository_url(registry), spec).get(BRANCH_PREFIX + spec.branches[0])
    except CommitError as exc:
        log.warning(f"nightly runs not tagged with a SHA: {exc}")
        return None


def nightly_schedule(job: dg.JobDefinition, cron: str = NIGHTLY_CRON
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
                partition_key=multi_partition_key(config, engine),
                # Run keys dedupe forever: one run per partition per night, even on a retried tick.
                run_key=f"nightly:{night}:{partition_key(config, engine)}",
                tags={TRIGGER_TAG: "schedule"},
            ))
        if not requests:
            return dg.SkipReason("no nightly-tier partitions")
        sha = default_branch_head(registry, context.log)
        if sha is not None:
            tags = {SHA_TAG: sha, TIER_TAG: NIGHTLY_TIER, RUNS_TAG: str(len(requests))}
            requests = [r.with_replaced_attrs(tags={**r.tags, **tags}) for r in requests]
        return resolve_run_requests(requests, context.repository_def.get_job(job.name), known,
                             context.instance)

    return nightly
