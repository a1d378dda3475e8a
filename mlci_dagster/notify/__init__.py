"""Dagster-free notifications: one message per failure signature (new, spreading, resolved,
regressed), posted to a Slack-compatible webhook and kept as one GitHub issue per signature."""

from mlci_dagster.notify.github import GitHubIssues, issue_title
from mlci_dagster.notify.message import (
    Kind,
    Notification,
    regression_notification,
    resolved_notification,
    signature_notification,
)
from mlci_dagster.notify.notifier import Notifier, NotifyError
from mlci_dagster.notify.webhook import Webhook, slack_payload

__all__ = [
    "GitHubIssues", "Kind", "Notification", "Notifier", "NotifyError", "Webhook",
    "issue_title", "regression_notification", "resolved_notification",
    "signature_notification", "slack_payload",
]
