"""Commit sensors: new commits and pull-request heads of the registry's repository, and labels
put on pull requests, each → one run set per SHA and tier; and the commit status that sums up
each run set on GitHub, kept as a `commit_summary` observation.

Run keys carry the SHA, the tier and the partition, so nothing runs twice; a newer SHA never
cancels an older one's runs. Cursors are JSON that Dagster stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta

import dagster as dg

from mlci_dagster.assets.external import COMMIT_SUMMARY, PULL_REQUEST_LABEL, RELEASE_QUALIFICATION
from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, multi_partition_key
from mlci_dagster.event_log import record_of_run
from mlci_dagster.notify import NotifyError
from mlci_dagster.paths import ui_base_url
from mlci_dagster.registry import Registry
from mlci_dagster.registry.quarantine import Quarantine, quarantine_or_none
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.resources.notify import NotifierResource
from mlci_dagster.schedules import NIGHTLY_TIER
from mlci_dagster.sensors.image_build import registry_or_skip
from mlci_dagster.tiers.commit_summary import FAILURE, PENDING, SUCCESS, PartitionRun, summarize
from mlci_dagster.tiers.commits import (
    BRANCH_PREFIX,
    FETCHED,
    CommitError,
    Mirror,
    RunSet,
    label_event,
    moved_heads,
    plan_run_set,
    repository_url,
    tiers_with_trigger,
    watched_refs,
)
from mlci_dagster.vocabulary import PARTITION_TAG, RUNS_TAG, SHA_TAG, TIER_TAG, TRIGGER_TAG

LABEL_EVENTS_PER_TICK = 200
RUNS_PER_TICK = 500
KEPT_SUMMARIES = 1000  # finished run sets remembered in the cursor



def _mirror(mlci: MlciResource, url: str) -> Mirror:
    return Mirror(url, mlci.home_path())


def run_set_requests(context: dg.SensorEvaluationContext, run_set: RunSet, known: set[str]
                     ) -> list[dg.RunRequest]:
    """One run per partition of the set whose config is a partition already; the set's size
    tag counts only those, so its summary waits for exactly these runs."""
    missing = sorted({c for c, _ in run_set.partitions if c not in known})
    if missing:
        context.log.warning(f"{', '.join(missing)}: not yet partitions (registry_sync adds them)")
    run_set = dataclasses.replace(run_set, partitions=tuple(
        (c, e) for c, e in run_set.partitions if c in known))
    context.log.info(f"{run_set.sha[:12]} {run_set.tier}: {len(run_set.partitions)} run(s) "
                     f"({run_set.reason})")
    return [dg.RunRequest(partition_key=multi_partition_key(config, engine),
                          run_key=run_set.run_key(config, engine),
                          tags={TRIGGER_TAG: "sensor", **run_set.tags()})
            for config, engine in run_set.partitions]


def commit_poll_sensor(job: dg.UnresolvedAssetJobDefinition, minimum_interval_seconds: int = 60
                       ) -> dg.SensorDefinition:
    @dg.sensor(name="commit_poll", job=job, minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Polls mlci.yaml's repository: a new commit on a watched branch "
                           "runs the merge tiers, a new pull-request head the pull_request "
                           "tiers (the partitions its change needs).")
    def commit_poll(context: dg.SensorEvaluationContext, mlci: MlciResource
                    ) -> dg.SensorResult | dg.SkipReason:
        registry = registry_or_skip(mlci)
        if isinstance(registry, dg.SkipReason):
            return registry
        spec = registry.settings.repository
        if spec is None:
            return dg.SkipReason("no repository in mlci.yaml: nothing to poll")
        last_seen: dict[str, str] = json.loads(context.cursor or "{}").get("refs", {})
        try:
            url = repository_url(registry)
            refs = watched_refs(url, spec)
            if context.cursor is None:
                # The first poll of a home records the heads as they are: commits and pull
                # requests from before are no new change, and a fresh UI starts nothing.
                return dg.SensorResult(cursor=json.dumps({"refs": refs}, sort_keys=True),
                                       skip_reason=f"first poll: {len(refs)} head(s) recorded "
                                       "as they are; a new commit or pull request from now on "
                                       "runs its tiers")
            heads = moved_heads(refs, last_seen)
            mirror = _mirror(mlci, url)
            if heads:
                mirror.fetch()
        except CommitError as exc:  # the cursor stays: these heads are read again
            return dg.SkipReason(f"repository not read: {exc}")
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        requests = []
        for head in heads:
            forced = head.previous is not None and not mirror.is_ancestor(head.previous,
                                                                          head.sha)
            if forced:
                context.log.info(f"{head.ref}: force-pushed from {head.previous[:12]} to "
                                 f"{head.sha[:12]}; the runs of {head.previous[:12]} stay")
            if head.trigger == "merge":
                base = head.previous if head.previous and not forced else \
                    mirror.first_parent(head.sha)
            else:
                base = refs.get(BRANCH_PREFIX + spec.branches[0])
            for tier in tiers_with_trigger(registry, head.trigger):
                try:
                    run_set = plan_run_set(registry, mirror, tier, head.sha, base, head.pr)
                except CommitError as exc:
                    context.log.warning(f"{head.ref}: {exc}")
                    continue
                requests += run_set_requests(context, run_set, known)
        cursor = json.dumps({"refs": refs}, sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        return dg.SensorResult(cursor=cursor, skip_reason=f"{len(heads)} moved ref(s) of "
                               f"{len(refs)} watched, nothing to run")

    return commit_poll


def _label_run_sets(context: dg.SensorEvaluationContext, registry: Registry, mlci: MlciResource,
                    metadata: dict) -> list[RunSet]:
    event = label_event(metadata)
    tiers = tiers_with_trigger(registry, "label", event.label)
    if not tiers:
        context.log.info(f"label '{event.label}': no tier with trigger 'label' names it")
        return []
    mirror, base = None, event.base
    if any(registry.settings.tiers[t].selection == "changed" for t in tiers):
        spec = registry.settings.repository
        if spec is None:
            raise CommitError("a label tier with selection 'changed' needs mlci.yaml's "
                              "repository to diff the pull request")
        mirror = _mirror(mlci, repository_url(registry))
        mirror.fetch()
        base = base or f"{FETCHED}heads/{spec.branches[0]}"
    return [plan_run_set(registry, mirror, tier, event.sha, base, event.pr)
            for tier in tiers]


def pr_label_sensor(job: dg.UnresolvedAssetJobDefinition, minimum_interval_seconds: int = 5
                    ) -> dg.SensorDefinition:
    @dg.sensor(name="pr_label", job=job, minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Turns each pull_request_label report into the run set of the "
                           "label tier the label names, for the pull request's head SHA.")
    def pr_label(context: dg.SensorEvaluationContext, mlci: MlciResource
                 ) -> dg.SensorResult | dg.SkipReason:
        after = json.loads(context.cursor or "{}").get("storage_id")
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=PULL_REQUEST_LABEL, after_storage_id=after),
            limit=LABEL_EVENTS_PER_TICK, ascending=True).records
        if not records:
            return dg.SkipReason("no new pull_request_label report")
        registry = registry_or_skip(mlci)
        if isinstance(registry, dg.SkipReason):
            return registry
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        requests = []
        for record in records:
            event = record.asset_materialization
            try:
                run_sets = _label_run_sets(context, registry, mlci,
                                           dict(event.metadata) if event else {})
            except CommitError as exc:
                context.log.warning(f"pull_request_label event {record.storage_id}: {exc}")
                continue
            for run_set in run_sets:
                requests += run_set_requests(context, run_set, known)
        cursor = json.dumps({"storage_id": records[-1].storage_id})
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        return dg.SensorResult(cursor=cursor, skip_reason=f"{len(records)} label report(s), "
                               "nothing to run")

    return pr_label


# --- the summary of each run set ------------------------------------------------------------


def partition_run(instance: dg.DagsterInstance, key: str, run: dg.DagsterRun) -> PartitionRun:
    """The run as its set's summary reads it: its status, and once it finished, what its
    results record says (its failing stage and tests, a rerun due, a pass on rerun)."""
    record = record_of_run(instance, run.run_id) if run.is_finished else None
    if record is None:
        return PartitionRun(key, run.run_id, run.status.value)
    complete = len(record.failing_tests) == record.failing_tests_total
    return PartitionRun(
        key, run.run_id, run.status.value,
        failed_stage=None if record.passed else record.failed_stage,
        awaiting_rerun=record.awaiting_rerun, flaky=record.passed and record.attempt > 1,
        failing_tests=tuple(t.id for t in record.failing_tests) if complete else (),
        finished_at=record.finished_at)


def run_set_runs(instance: dg.DagsterInstance, sha: str, tier: str
                 ) -> tuple[int, list[PartitionRun]]:
    """(the set's size, the latest run of each of its partitions)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={SHA_TAG: sha, TIER_TAG: tier}))
    latest: dict[str, dg.DagsterRun] = {}
    for run in runs:  # newest first: a re-execution or a deflake rerun stands for its partition
        latest.setdefault(run.tags.get(PARTITION_TAG, run.run_id), run)
    expected = max((int(r.tags.get(RUNS_TAG, "0")) for r in runs), default=0)
    return expected, [partition_run(instance, key, run) for key, run in latest.items()]


def runs_digest(runs: list[PartitionRun]) -> str:
    """The set's runs (the latest of each partition), as a short digest."""
    ids = ",".join(sorted(r.run_id for r in runs))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def qualifying_tiers(registry: Registry | None) -> set[str]:
    """The tiers whose fully passing run set qualifies a SHA: those with trigger nightly."""
    declared = tiers_with_trigger(registry, "nightly") if registry is not None else []
    return set(declared) or {NIGHTLY_TIER}


@dg.sensor(
    name="commit_status", minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Sets one GitHub commit status per SHA and tier (context 'mlci / <tier>'): "
                "pending once its first run started, then success or failure, and records "
                "each as a commit_summary observation; a passing nightly qualifies the SHA.",
)
def commit_status(context: dg.SensorEvaluationContext, notifier: NotifierResource,
                  mlci: MlciResource) -> dg.SensorResult:
    state = json.loads(context.cursor or "{}")
    posted: dict[str, str] = state.get("posted", {})  # "sha tier" → the state last posted
    # "sha tier" → the runs a final state was posted on: judged once per set of runs (a
    # re-execution is judged again; a quarantine edited since is not applied backwards).
    judged: dict[str, str] = state.get("judged", {})
    since = datetime.fromtimestamp(state.get("updated_after", 0.0), UTC)
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(updated_after=since), limit=RUNS_PER_TICK,
        order_by="update_timestamp", ascending=True)
    touched = {f"{r.dagster_run.tags[SHA_TAG]} {r.dagster_run.tags[TIER_TAG]}" for r in records
               if SHA_TAG in r.dagster_run.tags and TIER_TAG in r.dagster_run.tags}
    touched |= {group for group, last in posted.items() if last == PENDING}
    try:
        statuses = notifier.commit_statuses()
    except NotifyError as exc:
        return dg.SensorResult(skip_reason=f"notifier misconfigured: {exc}")
    registry = registry_or_skip(mlci)
    qualifying = qualifying_tiers(None if isinstance(registry, dg.SkipReason) else registry)
    quarantine, unreadable = (Quarantine(), "") if isinstance(registry, dg.SkipReason) \
        else quarantine_or_none(registry.root)
    if unreadable:
        context.log.warning(f"quarantine not applied, every failure counts: {unreadable}")
    events: list[dg.AssetObservation] = []
    ui_url = ui_base_url(None if isinstance(registry, dg.SkipReason)
                         else registry.settings.ui_base_url)
    for group in sorted(touched):
        sha, tier = group.split(" ")
        expected, runs = run_set_runs(context.instance, sha, tier)
        summary = summarize(sha, tier, expected, runs, ui_url, quarantine)
        last = posted.get(group)
        evidence = runs_digest(runs)
        if summary is None or summary.state == last or (
                summary.state == PENDING and last in (SUCCESS, FAILURE)) or (
                last in (SUCCESS, FAILURE) and judged.get(group) == evidence):
            continue
        if statuses is not None:
            try:
                statuses.set_status(sha, summary.state, summary.context, summary.description,
                                    summary.target_url)
            except NotifyError as exc:
                context.log.warning(f"{group}: {summary.state} not posted, retried: {exc}")
                continue
        posted.pop(group, None)
        posted[group] = summary.state
        judged[group] = evidence
        metadata = {"sha": sha, "tier": tier, "state": summary.state,
                    "context": summary.context, "summary": dg.MetadataValue.md(summary.markdown()),
                    "record": dg.MetadataValue.json(summary.to_dict()),
                    "target_url": dg.MetadataValue.url(summary.target_url)}
        events.append(dg.AssetObservation(COMMIT_SUMMARY, metadata=metadata))
        if summary.state == SUCCESS and tier in qualifying:
            events.append(dg.AssetObservation(RELEASE_QUALIFICATION, metadata={
                "sha": sha, "tier": tier, "partitions": len(runs),
                "record": dg.MetadataValue.json(summary.to_dict())}))
    latest = max((r.update_timestamp for r in records), default=since)
    finished = [g for g, s in posted.items() if s != PENDING]
    for group in finished[:max(0, len(finished) - KEPT_SUMMARIES)]:
        del posted[group]
    judged = {group: judged[group] for group in posted if group in judged}
    cursor = json.dumps({"posted": posted, "judged": judged, "updated_after": (
        latest.replace(tzinfo=latest.tzinfo or UTC) - timedelta(seconds=1)).timestamp()})
    return dg.SensorResult(asset_events=events, cursor=cursor,
                           skip_reason=None if events else
                           f"{len(touched)} run set(s) looked at, no new state")

