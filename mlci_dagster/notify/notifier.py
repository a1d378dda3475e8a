"""The channels together, and the notifier's durable state: what it has read and what is still
to send. A channel that fails keeps its notification pending, retried on the next tick, so a
failed POST is logged and retried, never lost; a channel that succeeded is not asked again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mlci_dagster.notify.github import GitHubIssues
from mlci_dagster.notify.message import Notification
from mlci_dagster.notify.transport import NotifyError
from mlci_dagster.notify.webhook import Webhook

WEBHOOK = "webhook"
GITHUB = "github"
# A channel down for days must not grow the cursor without bound: the oldest are dropped, loudly.
MAX_PENDING = 200


@dataclass
class Pending:
    """A notification and the channels that have not taken it yet."""

    notification: Notification
    channels: list[str]
    attempts: int = 0
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"notification": self.notification.to_dict(), "channels": self.channels,
                "attempts": self.attempts, "last_error": self.last_error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pending:
        return cls(Notification.from_dict(data["notification"]), list(data["channels"]),
                   int(data.get("attempts", 0)), data.get("last_error", ""))


@dataclass
class NotifierState:
    """Stored as the sensor cursor: results, check evaluations and culprit searches read up to
    these ids, the partitions whose regression alert is open (so an alert is announced once),
    the signature each failing partition last failed with, the open signatures (id -> text and
    the partitions announced with it), and what is pending."""

    results_after: int = 0
    checks_after: int = 0
    open_alerts: list[str] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)
    open_signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    searches_after: int = 0  # culprit_search observations read up to this storage id
    flaky_after: int = 0  # no_flaky_partitions evaluations read up to this id
    proposed: list[str] = field(default_factory=list)  # quarantine proposed, flaky since
    flaky_tests_after: int = 0  # no_flaky_tests evaluations read up to this id

    def members(self, signature: str) -> list[str]:
        """The partitions failing with `signature` now."""
        return sorted(p for p, s in self.failing.items() if s == signature)

    def to_json(self) -> str:
        return json.dumps({"results_after": self.results_after,
                           "checks_after": self.checks_after,
                           "open_alerts": sorted(self.open_alerts),
                           "pending": [p.to_dict() for p in self.pending],
                           "failing": self.failing, "open_signatures": self.open_signatures,
                           "searches_after": self.searches_after,
                           "flaky_after": self.flaky_after, "proposed": sorted(self.proposed),
                           "flaky_tests_after": self.flaky_tests_after})

    @classmethod
    def from_json(cls, text: str) -> NotifierState:
        data = json.loads(text)
        return cls(int(data.get("results_after", 0)), int(data.get("checks_after", 0)),
                   list(data.get("open_alerts", [])),
                   [Pending.from_dict(p) for p in data.get("pending", [])],
                   dict(data.get("failing", {})), dict(data.get("open_signatures", {})),
                   int(data.get("searches_after", 0)), int(data.get("flaky_after", 0)),
                   list(data.get("proposed", [])), int(data.get("flaky_tests_after", 0)))


@dataclass
class Notifier:
    """The configured channels; with none, notifications are disabled."""

    webhook: Webhook | None = None
    github: GitHubIssues | None = None

    @property
    def channels(self) -> list[str]:
        return [name for name, channel in ((WEBHOOK, self.webhook), (GITHUB, self.github))
                if channel is not None]

    @property
    def enabled(self) -> bool:
        return bool(self.channels)

    def deliver(self, pending: Pending) -> Pending | None:
        """Sends to every channel still owed; the remainder (with the error) or None when done."""
        failed, errors = [], []
        for channel in pending.channels:
            try:
                if channel == WEBHOOK and self.webhook is not None:
                    self.webhook.post(pending.notification)
                elif channel == GITHUB and self.github is not None:
                    self.github.deliver(pending.notification)
                # A channel no longer configured is dropped: there is nowhere to send it.
            except NotifyError as exc:
                failed.append(channel)
                errors.append(str(exc))
        if not failed:
            return None
        return Pending(pending.notification, failed, pending.attempts + 1, "; ".join(errors))


def deliver_in_order(notifier: Notifier, queue: list[Pending]) -> tuple[list[Pending], list[str]]:
    """Delivers the queue oldest first: (what is still pending, a line per failure).

    Once a channel fails for a signature, that signature's later notifications wait for it on
    that channel, so an issue is never closed before the failure that opened it was posted.
    """
    blocked: set[tuple[str, str]] = set()
    remaining: list[Pending] = []
    failures: list[str] = []
    for item in queue:
        partition = item.notification.signature
        held = [c for c in item.channels if (partition, c) in blocked]
        tryable = [c for c in item.channels if c not in held]
        left = notifier.deliver(Pending(item.notification, tryable, item.attempts,
                                        item.last_error)) if tryable else None
        if left is not None:
            failures.append(f"{item.notification.key} not delivered to {left.channels} "
                            f"(attempt {left.attempts}, retried next tick): {left.last_error}")
        channels = (left.channels if left else []) + held
        if channels:
            blocked.update((partition, c) for c in channels)
            remaining.append(Pending(item.notification, channels,
                                     left.attempts if left else item.attempts,
                                     left.last_error if left else item.last_error))
    return remaining, failures
