"""Announces failed lifecycles, recoveries and newly opened regression alerts through the
notifier resource. Reads `results` materializations and the history asset's
`no_new_regressions` evaluations after its cursor; what a channel did not take stays in the
cursor and is retried on the next tick."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import dagster as dg

from mlci_dagster.compat import check_evaluations_page
from mlci_dagster.event_log import RESULTS_ASSET, new_results, record_before
from mlci_dagster.notify import (
    Notification,
    NotifyError,
    failure_notification,
    recovery_notification,
    regression_notification,
)
from mlci_dagster.notify.notifier import (
    MAX_PENDING,
    Notifier,
    NotifierState,
    Pending,
    deliver_in_order,
)
from mlci_dagster.record import ResultRecord
from mlci_dagster.resources.notify import NotifierResource

REGRESSION_CHECK = dg.AssetCheckKey(dg.AssetKey("history"), "no_new_regressions")
RESULTS_PER_TICK = 500
CHECK_PAGE = 100


def result_notification(
    instance: dg.DagsterInstance, storage_id: int, record: ResultRecord, dagster_url: str
) -> Notification | None:
    """A failure for every failed lifecycle; a recovery for a pass that follows a failure."""
    if record.skipped:
        return None  # refused before it began (the budget): nothing of the product to tell
    if not record.passed:
        return failure_notification(record, dagster_url)
    previous = record_before(instance, record.partition, storage_id)
    if previous is not None and not previous.passed and not previous.skipped:
        return recovery_notification(record, dagster_url)
    return None


def regression_evaluations(
    instance: dg.DagsterInstance, after: int
) -> Iterator[tuple[int, dict[str, dict[str, Any]]]]:
    """(execution id, open alerts by partition) of each completed `no_new_regressions`
    evaluation after id `after`, oldest first."""
    found, cursor = [], None
    while True:
        page = check_evaluations_page(instance, REGRESSION_CHECK, CHECK_PAGE, cursor)
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
        entry = evaluation.metadata.get("partitions")
        alerts = entry.value if entry is not None else []
        yield execution.id, {a["partition"]: a for a in alerts}


def latest_state(instance: dg.DagsterInstance) -> NotifierState:
    """Where a notifier starts: after everything already recorded, with today's open alerts
    known, so enabling it announces what happens next rather than the whole history."""
    latest = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RESULTS_ASSET), limit=1).records
    state = NotifierState(results_after=latest[0].storage_id if latest else 0)
    for execution_id, alerts in regression_evaluations(instance, 0):
        state.checks_after, state.open_alerts = execution_id, sorted(alerts)
    return state


def collect(
    instance: dg.DagsterInstance, state: NotifierState, dagster_url: str
) -> list[Notification]:
    """New notifications since the cursor; advances it past what it read."""
    found = []
    for storage_id, record in islice(new_results(instance, state.results_after),
                                     RESULTS_PER_TICK):
        state.results_after = storage_id
        notification = result_notification(instance, storage_id, record, dagster_url)
        if notification is not None:
            found.append(notification)
    for execution_id, alerts in regression_evaluations(instance, state.checks_after):
        state.checks_after = execution_id
        for partition in sorted(set(alerts) - set(state.open_alerts)):
            alert = alerts[partition]
            found.append(regression_notification(partition, alert, dagster_url,
                                                 alert.get("failing_runs", 0)))
        state.open_alerts = sorted(alerts)
    return found


@dg.sensor(
    name="notify", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts failed lifecycles, recoveries and new regression alerts to the webhook "
                "and to one GitHub issue per partition.",
)
def notify(context: dg.SensorEvaluationContext, notifier: NotifierResource) -> dg.SensorResult:
    try:
        channels: Notifier = notifier.notifier()
    except NotifyError as exc:
        return dg.SensorResult(skip_reason=f"notifier misconfigured: {exc}")
    if not context.cursor or not channels.enabled:
        # First tick, or nowhere to send: follow the event log without announcing anything.
        state = latest_state(context.instance)
        return dg.SensorResult(
            cursor=state.to_json(),
            skip_reason="notifier disabled" if not channels.enabled else "cursor initialised")
    state = NotifierState.from_json(context.cursor)
    new = collect(context.instance, state, notifier.dagster_url)
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
    return dg.SensorResult(
        cursor=state.to_json(),
        skip_reason=f"{len(new)} new notification(s), {sent} delivered, "
                    f"{len(state.pending)} pending")
