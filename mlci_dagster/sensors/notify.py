"""Announces failures by signature through the notifier resource: one message when a signature
is new (with a machine-generated hypothesis when a root-cause analyzer is configured), one when
it spreads to more partitions, one when none fails with it any more, and one per signature of
newly opened regression alerts, and one when a culprit search names its culprit or stops.
Reads `results` materializations, the history asset's `no_new_regressions` evaluations and the
`culprit_search` observations after its cursor; what a channel did not take stays in the cursor
and is retried on the next tick."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import dagster as dg

from mlci_dagster.assets.external import SIGNATURES_ASSET
from mlci_dagster.compat import check_evaluations_page
from mlci_dagster.event_log import last_pass_before, latest_result_id, new_results
from mlci_dagster.history.links import Link
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.notify import (
    Kind,
    Notification,
    NotifyError,
    regression_notification,
    resolved_notification,
    signature_notification,
)
from mlci_dagster.notify.message import (
    culprit_notification,
    quarantine_notification,
    signature_of_record,
)
from mlci_dagster.notify.notifier import (
    MAX_PENDING,
    Notifier,
    NotifierState,
    Pending,
    deliver_in_order,
)
from mlci_dagster.notify.rootcause import ChatCompletionsAnalyzer, Evidence
from mlci_dagster.providers.logpipe import log_tail
from mlci_dagster.registry import Registry
from mlci_dagster.registry.models import QuarantineSettings
from mlci_dagster.registry.quarantine import quarantine_or_none
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.resources.notify import NotifierResource, RootCauseResource
from mlci_dagster.searches import OPEN_STATES, SEARCH_ASSET, search_summary

REGRESSION_CHECK = dg.AssetCheckKey(dg.AssetKey("history"), "no_new_regressions")
FLAKY_CHECK = dg.AssetCheckKey(dg.AssetKey("history"), "no_flaky_partitions")
FLAKY_TESTS_CHECK = dg.AssetCheckKey(dg.AssetKey("test_history"), "no_flaky_tests")
RESULTS_PER_TICK = 500
CHECK_PAGE = 100


def check_entries(
    instance: dg.DagsterInstance, after: int, check: dg.AssetCheckKey = REGRESSION_CHECK,
) -> Iterator[tuple[int, dict[str, dict[str, Any]]]]:
    """(execution id, its entries by target) of each completed evaluation of `check` after id
    `after`, oldest first. Default: `no_new_regressions`, whose entries are the open alerts; a
    target is a partition, or a test of one (`partition :: test id`)."""
    found, cursor = [], None
    while True:
        page = check_evaluations_page(instance, check, CHECK_PAGE, cursor)
        newer = [r for r in page if r.id > after]
        found += newer
        if len(newer) < len(page) or len(page) < CHECK_PAGE:
            break
        cursor = page[-1].id
    for execution in reversed(found):
        event = execution.event.dagster_event if execution.event else None
        evaluation = event.event_specific_data if event else None
        if not isinstance(evaluation, dg.AssetCheckEvaluation):
            continue  # planned only; a later evaluation carries the newer alert state
        entry = evaluation.metadata.get("partitions") or evaluation.metadata.get("tests")
        alerts = entry.value if entry is not None else []
        yield execution.id, {target_of(a): a for a in alerts}


def target_of(entry: dict[str, Any]) -> str:
    """A check entry's partition, or its test: `partition :: test id` (as quarantine says)."""
    return entry["partition"] + (f" :: {entry['test']}" if entry.get("test") else "")


def latest_state(instance: dg.DagsterInstance) -> NotifierState:
    """Where a notifier starts: after everything already recorded, with today's open alerts
    known, so enabling it announces what happens next rather than the whole history."""
    searches = instance.fetch_observations(SEARCH_ASSET, limit=1).records
    state = NotifierState(results_after=latest_result_id(instance),
                          searches_after=searches[0].storage_id if searches else 0)
    for execution_id, alerts in check_entries(instance, 0):
        state.checks_after, state.open_alerts = execution_id, sorted(alerts)
    for execution_id, flaky in check_entries(instance, 0, FLAKY_CHECK):
        state.flaky_after = execution_id
        state.proposed = sorted({*state.proposed, *flaky})
    for execution_id, flaky in check_entries(instance, 0, FLAKY_TESTS_CHECK):
        state.flaky_tests_after = execution_id
        state.proposed = sorted({*state.proposed, *flaky})
    return state


def collect(
    instance: dg.DagsterInstance, state: NotifierState, dagster_url: str,
    explain: Callable[[list[ResultRecord]], str] = lambda records: "",
    quarantine: QuarantineSettings | None = None, quarantined: Collection[str] = (),
    link: Link | None = None,
) -> list[Notification]:
    """New notifications since the cursor, one per signature: new ones (explained by
    `explain` when an analyzer is configured), those that spread to more partitions, those no
    partition fails with any more, and regression alerts grouped by signature; and a
    quarantine proposal for each partition newly flaky past `quarantine.propose_above` that is
    not `quarantined` already. Advances the cursor past what it read."""
    grouped: dict[str, list[ResultRecord]] = {}
    ended: dict[str, ResultRecord] = {}  # signature -> a result that took a partition off it
    for storage_id, record in islice(new_results(instance, state.results_after),
                                     RESULTS_PER_TICK):
        state.results_after = storage_id
        if not record.judged or record.out_of_line or record.awaiting_rerun:
            continue  # no verdict (refused, interrupted, a rerun due), or a culprit rerun
        before = state.failing.pop(record.partition, None)
        if not record.passed:
            signature = signature_of_record(record).id
            state.failing[record.partition] = signature
            grouped.setdefault(signature, []).append(record)
        if before is not None and state.failing.get(record.partition) != before:
            ended[before] = record
    found = []
    for signature, records in grouped.items():
        opened = state.open_signatures.get(signature)
        if opened is None:
            notification = signature_notification(records, dagster_url, link=link)
            notification.hypothesis = explain(records)
            found.append(notification)
        else:
            joined = [r for r in records if r.partition not in opened["partitions"]]
            if joined:
                found.append(signature_notification(joined, dagster_url, Kind.SPREAD, link))
        state.open_signatures[signature] = {
            "text": signature_of_record(records[0]).text,
            "partitions": sorted({*(opened or {}).get("partitions", []),
                                  *(r.partition for r in records)})}
    for signature, opened in list(state.open_signatures.items()):
        if not state.members(signature):
            found.append(resolved_notification(signature, opened["text"], ended.get(signature),
                                               dagster_url, opened["partitions"]))
            del state.open_signatures[signature]
    for execution_id, alerts in check_entries(instance, state.checks_after):
        state.checks_after = execution_id
        new = {p: alerts[p] for p in sorted(set(alerts) - set(state.open_alerts))}
        by_signature: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for partition, alert in new.items():
            first_fail = alert.get("first_fail") or {}
            key = (first_fail.get("signature") or "", first_fail.get("signature_text") or "")
            by_signature.setdefault(key, {})[partition] = alert
        for (signature, text), group in by_signature.items():
            found.append(regression_notification(signature, text, group, dagster_url, link))
        state.open_alerts = sorted(alerts)
    found += proposals(instance, state, dagster_url, quarantine, quarantined)
    for storage_id, ended in ended_searches(instance, state.searches_after):
        state.searches_after = storage_id
        if ended is not None:
            found.append(culprit_notification(ended, dagster_url))
    return found


def proposals(instance: dg.DagsterInstance, state: NotifierState, dagster_url: str,
              settings: QuarantineSettings | None, quarantined: Collection[str]
              ) -> list[Notification]:
    """A quarantine proposal for each partition (and each test) that the history's latest
    no_flaky_partitions (no_flaky_tests) evaluations find flaky past the threshold, once while
    it stays flaky. `quarantined`: the targets quarantined already."""
    found = []
    for check, cursor in ((FLAKY_CHECK, "flaky_after"), (FLAKY_TESTS_CHECK, "flaky_tests_after")):
        for execution_id, flaky in check_entries(instance, getattr(state, cursor),
                                                          check):
            setattr(state, cursor, execution_id)
            if settings is None or settings.propose_above is None:
                continue
            expires = (datetime.now(UTC) + timedelta(days=settings.days)).date().isoformat()
            for target, entry in sorted(flaky.items()):
                if target not in state.proposed and target not in quarantined \
                        and float(entry["transition_rate"]) >= settings.propose_above:
                    found.append(quarantine_notification(entry, settings.propose_above, expires,
                                                         dagster_url))
                    state.proposed.append(target)
            # Proposed again once it relapses after a spell of not being flaky.
            tests = check == FLAKY_TESTS_CHECK
            state.proposed = sorted(p for p in state.proposed
                                    if p in flaky or (" :: " in p) != tests)
    return found


def ended_searches(instance: dg.DagsterInstance, after: int
                   ) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(storage id, the summary of a culprit search that ended there, else None) of each
    culprit_search observation after `after`, oldest first."""
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=SEARCH_ASSET, after_storage_id=after or None),
        limit=RESULTS_PER_TICK, ascending=True).records
    for entry in records:
        found = search_summary(entry)
        yield entry.storage_id, found if found and found["state"] not in OPEN_STATES else None


def evidence_of(instance: dg.DagsterInstance, records: list[ResultRecord],
                analyzer: ChatCompletionsAnalyzer) -> Evidence:
    """What the analyzer is given for a new signature: redacted by the analyzer once more."""
    first = records[0]
    signature = signature_of_record(first)
    last_pass = last_pass_before(instance, first)
    keys = ("image_digest", "config_id", "code_version")
    return Evidence(
        signature=signature.id, text=signature.text,
        partitions=sorted({r.partition for r in records}), error_summary=first.error_summary,
        log_tails={r.partition: analyzer.redactor.text(log_tail(r.log_ref))
                   for r in records[:3] if r.log_ref},
        changes={"first_failure": {k: getattr(first, k) for k in keys},
                 "last_pass": {k: getattr(last_pass, k) for k in keys} if last_pass else None,
                 "changed": [k for k in keys if last_pass and
                             getattr(last_pass, k) != getattr(first, k)]})





def signatures_observation(notifications: list[Notification], analyzer: str
                           ) -> dg.AssetObservation | None:
    """The signatures this tick announced, newly seen, spreading or resolved, with any
    machine-generated hypothesis, as one observation of `failure_signatures`."""
    entries = [{"signature": n.signature, "text": n.signature_text, "event": str(n.kind),
                "partitions": n.partitions, "first_run": n.run_id,
                **({"hypothesis (machine-generated)": n.hypothesis, "analyzer": analyzer}
                   if n.hypothesis else {})}
               for n in notifications if n.kind not in (Kind.REGRESSION, Kind.CULPRIT)]
    if not entries:
        return None
    table = "\n".join(f"- **{e['event']}** `{e['signature']}` {e['text']}: "
                      f"{', '.join(e['partitions'])}"
                      + (f"\n  - *machine-generated hypothesis ({analyzer}), unverified:* "
                         f"{e['hypothesis (machine-generated)']}" if "analyzer" in e else "")
                      for e in entries)
    return dg.AssetObservation(asset_key=SIGNATURES_ASSET.key, metadata={
        "signatures": dg.MetadataValue.md(table),
        "entries": dg.MetadataValue.json(entries)})


def quarantined_targets(registry: Registry, log: dg.DagsterLogManager) -> set[str]:
    """The partitions and tests quarantined now (none proposed again); none when the file is
    unreadable (said in the log)."""
    quarantine, unreadable = quarantine_or_none(registry.root)
    if unreadable:
        log.warning(f"quarantine.yaml not read: {unreadable}")
    return {e.target for e in quarantine.quarantine if e.active(time.time())}


@dg.sensor(
    name="notify", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts one message per failure signature (new, spreading, resolved) and per "
                "signature of newly regressed partitions, to the webhook and to one GitHub issue "
                "per signature; and proposes quarantining a partition flaky past "
                "quarantine.propose_above.",
)
def notify(context: dg.SensorEvaluationContext, notifier: NotifierResource,
           mlci: MlciResource, root_cause: RootCauseResource) -> dg.SensorResult:
    try:
        channels: Notifier = notifier.notifier()
        registry = mlci.registry()
        analyzer = root_cause.analyzer(registry.secret_names)
    except NotifyError as exc:
        return dg.SensorResult(skip_reason=f"notifier misconfigured: {exc}")
    if not context.cursor or not channels.enabled:
        # First tick, or nowhere to send: follow the event log without announcing anything.
        state = latest_state(context.instance)
        return dg.SensorResult(
            cursor=state.to_json(),
            skip_reason="notifier disabled" if not channels.enabled else "cursor initialised")
    state = NotifierState.from_json(context.cursor)

    def explain(records: list[ResultRecord]) -> str:
        if analyzer is None:
            return ""
        try:
            return analyzer.hypothesis(evidence_of(context.instance, records, analyzer))
        except NotifyError as exc:
            context.log.warning(f"no root-cause hypothesis: {exc}")
            return ""

    linking = mlci.linking()
    new = collect(context.instance, state, linking.ui_url, explain,
                  registry.settings.quarantine, quarantined_targets(registry, context.log),
                  linking.link)
    queue = state.pending + [Pending(n, channels.channels) for n in new]
    state.pending, failures = deliver_in_order(channels, queue)
    for failure in failures:
        context.log.warning(failure)
    if len(state.pending) > MAX_PENDING:
        dropped = state.pending[:-MAX_PENDING]
        context.log.error(f"dropping {len(dropped)} undelivered notification(s) after "
                          f"{MAX_PENDING} pending: {[p.notification.key for p in dropped]}")
        state.pending = state.pending[-MAX_PENDING:]
    sent = len(queue) - len(state.pending)
    context.log.info(f"notify: {len(new)} new, {sent} delivered, {len(state.pending)} pending")
    observation = signatures_observation(new, analyzer.name if analyzer else "")
    return dg.SensorResult(
        cursor=state.to_json(), asset_events=[observation] if observation else [],
        skip_reason=None if observation else f"{len(new)} new notification(s), {sent} "
        f"delivered, {len(state.pending)} pending")
