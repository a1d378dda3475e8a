"""Culprit searches as the Dagster instance holds them (the arithmetic is `culprits/`'s): one is
opened from a partition's results (by the culprit_search sensor, the find_culprit job or `mlci
culprit find`, all through `open_search`), its reruns are the lifecycle runs tagged with it,
read back to choose the next ones (`step`), and each state it reaches is a `culprit_search`
observation, which the notifier and `mlci culprit list` read."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from mlci_dagster.cost import estimate_run, hourly_rate
from mlci_dagster.culprits.bisect import Rerun, RerunKind, RerunStatus, State, Verdict
from mlci_dagster.culprits.search import (
    Search,
    SearchRefused,
    budget_refusal,
    fitting_width,
    rerun_status,
    summary,
    worst_case_runs,
)
from mlci_dagster.event_log import LOOK_BACK, partition_results, record_of_run
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.history.signature import signature_of
from mlci_dagster.launch.pools import pool_limits, pool_of
from mlci_dagster.launch.runner import PartitionRun, RunEvents, run_partitions
from mlci_dagster.launch.runner import Verdict as RunVerdict
from mlci_dagster.registry import Registry
from mlci_dagster.spend import month_spend
from mlci_dagster.tiers.commits import CommitError, Mirror, repository_url
from mlci_dagster.vocabulary import (
    BATCH_TAG,
    CULPRIT_SEARCH,
    CULPRIT_TRIGGER,
    RERUN_KIND_TAG,
    RERUNNABLE_KINDS,
    SEARCH_TAG,
    SHA_TAG,
    TRIGGER_TAG,
    split_partition_key,
)

SEARCH_ASSET = dg.AssetKey(CULPRIT_SEARCH)
OPEN_STATES = (State.RUNNING, State.CULPRIT)


def starts_regression(instance: dg.DagsterInstance, storage_id: int, record: ResultRecord
                      ) -> bool:
    """A product or timeout failure at a commit, right after a pass (and confirmed by its
    reruns, if it had any): what a search bisects."""
    if record.passed or not record.judged or record.out_of_line or not record.sha \
            or record.failure_kind not in RERUNNABLE_KINDS or record.awaiting_rerun:
        return False  # a failure awaiting its rerun may yet be a flake
    before = [r for r in partition_results(instance, record.partition, before=storage_id)
              if r.cell != record.cell]
    return bool(before) and before[0].passed


def _regression(records: list[ResultRecord], good: str | None, bad: str | None
                ) -> tuple[ResultRecord, ResultRecord]:
    """(last pass, first failure) of the partition's latest failing streak, or of the runs at
    the commits `good` and `bad` (a prefix of their SHA) when given."""
    def at(sha: str, passing: bool) -> ResultRecord:
        found = next((r for r in records if r.sha and r.sha.startswith(sha)
                      and r.passed == passing), None)
        if found is None:
            raise SearchRefused(f"no {'passing' if passing else 'failing'} result at commit "
                                f"{sha} among the partition's last {LOOK_BACK}")
        return found

    if bad is not None:
        first_fail = at(bad, passing=False)
    else:
        if not records or records[0].passed:
            raise SearchRefused("the partition passes now: there is no regression to bisect")
        streak = next((i for i, r in enumerate(records) if r.passed), len(records))
        first_fail = records[streak - 1]
    if good is not None:
        return at(good, passing=True), first_fail
    last_pass = next((r for r in records if r.passed and r.finished_at < first_fail.finished_at),
                     None)
    if last_pass is None:
        raise SearchRefused(f"no passing result before the first failure "
                            f"(run {first_fail.run_id[:8]}) on record")
    return last_pass, first_fail


def open_search(instance: dg.DagsterInstance, registry: Registry, home: Path, partition: str,
                *, driver: str, good: str | None = None, bad: str | None = None,
                now: float | None = None) -> tuple[Search, bool]:
    """The search of the partition's regression (its latest, or between the commits `good` and
    `bad`): (the search, True) when it is new, recorded as started; (the search, False) when
    the same one was opened before. SearchRefused saying why there is nothing to search, or
    why this one may not start (its runs or its cost would pass their bounds)."""
    try:
        config = split_partition_key(partition)[0]
    except ValueError as exc:
        raise SearchRefused(str(exc)) from None
    if unknown := registry.unknown_key(partition):
        raise SearchRefused(unknown)
    last_pass, first_fail = _regression(partition_results(instance, partition), good, bad)
    if not last_pass.sha or not first_fail.sha:
        raise SearchRefused(f"runs {last_pass.run_id[:8]} and {first_fail.run_id[:8]} did not "
                            "test a commit (no mlci/sha tag): no range of commits to bisect")
    if first_fail.failure_kind not in RERUNNABLE_KINDS:
        raise SearchRefused(f"run {first_fail.run_id[:8]} failed for {first_fail.failure_kind}: "
                            "only product and timeout failures are a change's doing")
    if last_pass.config_id != first_fail.config_id:
        raise SearchRefused("the test changed between the last pass and the first failure "
                            f"(config id {last_pass.config_id} → {first_fail.config_id})")
    found = signature_of(first_fail.failed_stage, first_fail.failure_kind,
                         first_fail.error_summary)
    assert found is not None, "a failed record has a failed stage"
    search_id = Search.id_of(partition, found.id, last_pass.sha, first_fail.sha)
    known = latest_searches(instance).get(search_id)
    if known is not None:
        return Search.model_validate(known["search"]), False
    try:
        mirror = Mirror(repository_url(registry), home).fetched(last_pass.sha, first_fail.sha)
        if not mirror.is_ancestor(last_pass.sha, first_fail.sha):
            raise SearchRefused(f"{last_pass.sha[:12]} (last pass) is not an ancestor of "
                                f"{first_fail.sha[:12]} (first failure)")
        subjects = {last_pass.sha: mirror.subject(last_pass.sha),
                    **mirror.between(last_pass.sha, first_fail.sha)}
        commits = list(subjects)[1:]
    except CommitError as exc:
        raise SearchRefused(f"the repository cannot be read: {exc}") from None
    if len(commits) <= 1:
        raise SearchRefused(f"the range is one commit: {first_fail.sha[:12]} "
                            f"{subjects.get(first_fail.sha, '')} came with the failure, nothing "
                            "to bisect")
    settings = registry.settings.culprit_search
    width = min(settings.max_width, pool_limits(registry.settings).get(
        pool_of(registry, config), settings.max_width))
    width = fitting_width(len(commits), width, settings.max_runs)
    if width == 0:
        raise SearchRefused(f"naming and confirming a culprit among {len(commits)} commits "
                            f"takes up to {worst_case_runs(len(commits), 1)} reruns, over "
                            f"culprit_search.max_runs {settings.max_runs}")
    refused = _budget_refusal(instance, registry, partition, worst_case_runs(len(commits), width))
    if refused:
        raise SearchRefused(refused)
    search = Search(
        id=search_id, partition=partition, signature=found.id, signature_text=found.text,
        last_pass=last_pass.sha, commits=commits, subjects=subjects,
        last_pass_run=last_pass.run_id, first_fail_run=first_fail.run_id,
        max_runs=settings.max_runs, width=width, driver=driver,
        started_at=time.time() if now is None else now)
    instance.report_runless_asset_event(observation(search, step(instance, search)))
    return search, True


def _budget_refusal(instance: dg.DagsterInstance, registry: Registry, partition: str,
                    runs: int) -> str | None:
    config = registry.configs[split_partition_key(partition)[0]].config
    rate = hourly_rate(config, registry.settings.costs)
    budget = registry.settings.budget
    if not rate or budget is None:
        return None
    spend, costs = month_spend(instance, registry, run_id="")
    estimate = estimate_run(config, rate, costs.past(partition))
    return budget_refusal(runs, estimate.usd, spend.total_usd, budget.monthly_usd)


# --- the reruns ---------------------------------------------------------------------------


def rerun_tags(search: Search, rerun: Rerun) -> dict[str, str]:
    """What a rerun's Dagster run carries: visible in the UI, read back by `step`."""
    return {SEARCH_TAG: search.id, SHA_TAG: rerun.commit, RERUN_KIND_TAG: str(rerun.kind),
            TRIGGER_TAG: CULPRIT_TRIGGER, BATCH_TAG: f"culprit search {search.id}"}


def rerun_key(search: Search, rerun: Rerun) -> str:
    """The run key a sensor requests it under: each rerun is launched once."""
    return f"culprit:{search.id}:{rerun.kind}:{rerun.commit}"


@dataclass
class Step:
    """Where a search stands: its reruns so far (each with its run id), the verdict they give,
    and the reruns to start now."""

    search: Search
    reruns: list[tuple[Rerun, str]] = field(default_factory=list)
    verdict: Verdict = field(default_factory=lambda: Verdict(State.RUNNING))
    next: list[Rerun] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.verdict.state not in OPEN_STATES

    @property
    def in_progress(self) -> int:
        return sum(r.status is RerunStatus.IN_PROGRESS for r, _ in self.reruns)

    def summary(self) -> dict[str, Any]:
        return summary(self.search, self.verdict, self.reruns)


def reruns_of(instance: dg.DagsterInstance, search: Search) -> list[tuple[Rerun, str]]:
    """The search's reruns, oldest first, each as it counts now."""
    runs = instance.get_runs(dg.RunsFilter(tags={SEARCH_TAG: search.id}))
    found = []
    for run in reversed(list(runs)):
        record = record_of_run(instance, run.run_id) if run.is_finished else None
        found.append((Rerun(run.tags[SHA_TAG],
                            rerun_status(run.is_finished, record, search.signature),
                            RerunKind(run.tags.get(RERUN_KIND_TAG, RerunKind.BISECTION))),
                      run.run_id))
    return found


def step(instance: dg.DagsterInstance, search: Search) -> Step:
    """The search's verdict from its reruns, and the reruns to start now: at most its width
    less those in progress, never past its maximum."""
    reruns = reruns_of(instance, search)
    bisection = search.bisection([r for r, _ in reruns])
    done = Step(search, reruns, bisection.verdict())
    done.next = bisection.next_runs(max(0, search.width - done.in_progress))
    return done


# --- the record ---------------------------------------------------------------------------


def observation(search: Search, done: Step) -> dg.AssetObservation:
    """The search's state as a culprit_search observation."""
    record = done.summary()
    lines = [f"**{search.partition}** `{search.signature_text}`: {record['text']}", "",
             f"range: {len(search.commits)} commits after {search.commit_text(search.last_pass)}"
             f" up to {search.commit_text(search.commits[-1])}", "",
             "| commit | why | result | run |", "| --- | --- | --- | --- |"]
    lines += [f"| {search.commit_text(r.commit)} | {r.kind} | {r.status} | {run_id[:8]} |"
              for r, run_id in done.reruns]
    return dg.AssetObservation(SEARCH_ASSET, metadata={
        "search_id": search.id, "partition": search.partition, "state": record["state"],
        "text": record["text"], "culprit": record["culprit"] or "",
        "reruns": len(done.reruns), "summary": dg.MetadataValue.md("\n".join(lines)),
        "record": dg.MetadataValue.json(record)})


def refusal_observation(partition: str, why: str, **facts: str) -> dg.AssetObservation:
    """A search that did not start, and why: seen in the UI beside the ones that did."""
    return dg.AssetObservation(SEARCH_ASSET, metadata={
        "partition": partition, "state": "refused", "text": f"not searched: {why}", **facts})


def search_summary(entry: Any) -> dict[str, Any] | None:
    """The summary a culprit_search observation (an event log record) holds; None for a
    refusal, which holds no search."""
    event = entry.asset_observation
    record = event.metadata.get("record") if event is not None else None
    return dict(record.value) if record is not None else None


def latest_searches(instance: dg.DagsterInstance, limit: int = 1000
                    ) -> dict[str, dict[str, Any]]:
    """Search id -> its latest recorded summary (with `storage_id`), newest first."""
    found: dict[str, dict[str, Any]] = {}
    for entry in instance.fetch_observations(SEARCH_ASSET, limit=limit).records:
        value = search_summary(entry)
        if value is not None:
            found.setdefault(value["search"]["id"], {**value, "storage_id": entry.storage_id})
    return found


def open_searches(instance: dg.DagsterInstance, driver: str
                  ) -> list[tuple[Search, dict[str, Any]]]:
    """The searches still running that `driver` advances, each with its latest summary."""
    return [(search, value) for value in latest_searches(instance).values()
            if value["state"] in OPEN_STATES
            and (search := Search.model_validate(value["search"])).driver == driver]


# --- driven from here (`mlci culprit find`) ----------------------------------------------------


@dataclass
class Drive:
    """How a search driven from here ended: its last step, the rounds of reruns it took, and
    why it stopped before a verdict ("" when it reached one)."""

    last: Step
    rounds: int = 0
    stopped: str = ""


def drive(instance: dg.DagsterInstance, registry: Registry, home: Path, search: Search,
          events: RunEvents, max_wait_s: float) -> Drive:
    """Runs the search to its verdict from this process, as `mlci run` runs partitions: each
    round its next reruns side by side (within its pool, as the run queue would admit them),
    then its state recorded. Stops early when interrupted, or when a round started nothing."""
    config, _ = split_partition_key(search.partition)
    pool, limits = pool_of(registry, config), pool_limits(registry.settings)
    driven = Drive(step(instance, search))
    while not driven.last.done and driven.last.next:
        items = [PartitionRun(search.partition, str(uuid.uuid4()), pool,
                              tags=rerun_tags(search, rerun)) for rerun in driven.last.next]
        _, stopped = run_partitions(
            instance, registry.root, items, limits, len(items), CULPRIT_TRIGGER, home, events,
            batch=f"culprit search {search.id}", max_wait_s=lambda _: max_wait_s)
        driven.rounds += 1
        driven.last = step(instance, search)
        instance.report_runless_asset_event(observation(search, driven.last))
        if stopped or all(item.verdict is RunVerdict.NOT_RUN for item in items):
            driven.stopped = stopped or "; ".join(sorted({item.why for item in items}))
            break
    return driven
