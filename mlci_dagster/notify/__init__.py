"""Dagster-free notifications: messages built from a results record or a history regression,
posted to a Slack-compatible webhook and kept as one GitHub issue per partition."""

from mlci_dagster.notify.github import GitHubIssues, issue_title
from mlci_dagster.notify.message import (
    Kind,
    Notification,
    failure_notification,
    recovery_notification,
    regression_notification,
)
from mlci_dagster.notify.notifier import Notifier, NotifyError
from mlci_dagster.notify.webhook import Webhook, slack_payload

__all__ = [
    "GitHubIssues", "Kind", "Notification", "Notifier", "NotifyError", "Webhook",
    "failure_notification", "issue_title", "recovery_notification", "regression_notification",
    "slack_payload",
]
