"""The nightly schedule: one run per applicable (config, engine) of the nightly tier, at
`nightly.at` in `nightly.timezone` (mlci.yaml), after the pre-batch guard has put every
reservation in order; a reservation still held or dirty has its runs skipped, with the reason,
while the others' go ahead.

Dagster's `build_schedule_from_partitioned_job` rejects dynamic × static partitions, so the
run requests are built here from the registry.
"""

from typing import Any

import dagster as dg

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, multi_partition_key
from mlci_dagster.assets.reservations import daytime_reservations
from mlci_dagster.compat import resolve_run_requests
from mlci_dagster.operations import guard_batch
from mlci_dagster.registry import Registry
from mlci_dagster.registry.models import Settings
from mlci_dagster.registry.reservations import NightlySettings, ReservationSpec
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.tiers.commits import BRANCH_PREFIX, CommitError, repository_url, watched_refs
from mlci_dagster.vocabulary import (
    BATCH_TAG,
    HOLD_DOWN_JOB,
    HOLD_UP_JOB,
    RUNS_TAG,
    SHA_TAG,
    TIER_TAG,
    TRIGGER_TAG,
    partition_key,
)

NIGHTLY_TIER = "nightly"


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


def nightly_schedule(job: dg.JobDefinition, nightly: NightlySettings) -> dg.ScheduleDefinition:
    @dg.schedule(name="nightly", job=job, cron_schedule=nightly.cron,
                 execution_timezone=nightly.timezone,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"Every nightly-tier config on every engine it applies to, at "
                             f"{nightly.at} {nightly.timezone}, after the pre-batch guard.")
    def nightly_batch(context: dg.ScheduleEvaluationContext, mlci: MlciResource):
        registry = mlci.registry()
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        night = context.scheduled_execution_time.strftime("%Y-%m-%d")
        partitions = [(c, e) for c, e in registry.partitions(tier=NIGHTLY_TIER) if c in known]
        for name, problems in registry.invalid.items():  # the registry_valid check says more
            context.log.warning(f"{name}: left out until its file is valid: {problems[0]}")
        refused = guard_batch(context.instance, mlci, partitions, context.log.info)
        for name, why in refused.items():
            context.log.warning(f"{name}: its runs are skipped: {why}")
        requests = []
        for config, engine in registry.partitions(tier=NIGHTLY_TIER):
            if config not in known:
                context.log.warning(f"{config}: not yet a partition (registry_sync adds it)")
                continue
            if registry.configs[config].config.sandbox.reservation in refused:
                continue
            requests.append(dg.RunRequest(
                partition_key=multi_partition_key(config, engine),
                # Run keys dedupe forever: one run per partition per night, even on a retried tick.
                run_key=f"nightly:{night}:{partition_key(config, engine)}",
                tags={TRIGGER_TAG: "schedule", BATCH_TAG: f"nightly {night}",
                      TIER_TAG: NIGHTLY_TIER},
            ))
        if not requests:
            return dg.SkipReason("no nightly-tier partitions" + "".join(
                f"; reservation {name} refused: {why}" for name, why in refused.items()))
        sha = default_branch_head(registry, context.log)
        if sha is not None:
            tags = {SHA_TAG: sha, RUNS_TAG: str(len(requests))}
            requests = [r.with_replaced_attrs(tags={**r.tags, **tags}) for r in requests]
        return resolve_run_requests(requests, context.repository_def.get_job(job.name), known,
                             context.instance)

    return nightly_batch


def schedule_name(action: str, reservation: str) -> str:
    return f"{action}_{reservation.replace('-', '_')}"


def hold_schedules(settings: Settings, jobs: list[Any]) -> list[dg.ScheduleDefinition]:
    """Each daytime reservation's up every morning and down every evening of its weekdays, in
    its timezone, running the hold_up and hold_down jobs."""
    by_name = {job.name: job for job in jobs}
    if HOLD_UP_JOB not in by_name:
        return []
    return [schedule for spec in daytime_reservations(settings)
            for schedule in _hold_schedules(spec, by_name[HOLD_UP_JOB], by_name[HOLD_DOWN_JOB])]


def _hold_schedules(spec: ReservationSpec, up_job: Any, down_job: Any
                    ) -> list[dg.ScheduleDefinition]:
    schedules = []
    for action, job, cron in ((HOLD_UP_JOB, up_job, spec.up_cron()),
                              (HOLD_DOWN_JOB, down_job, spec.down_cron())):

        def request(context: dg.ScheduleEvaluationContext, action: str = action
                    ) -> dg.RunRequest:
            day = context.scheduled_execution_time.strftime("%Y-%m-%d")
            return dg.RunRequest(partition_key=spec.name,
                                 run_key=f"{action}:{spec.name}:{day}",
                                 tags={TRIGGER_TAG: "schedule"})

        schedules.append(dg.ScheduleDefinition(
            name=schedule_name(action, spec.name), job=job, cron_schedule=cron,
            execution_timezone=spec.timezone, execution_fn=request,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"{action.replace('_', ' ')} {spec.name}'s daytime deployment at "
                        f"{spec.daytime.up if action == HOLD_UP_JOB else spec.daytime.down} "
                        f"{spec.timezone}, {', '.join(spec.daytime.weekdays)}."))
    return schedules
