"""A Slack-compatible incoming webhook: `{"text": ..., "blocks": [...]}` in mrkdwn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlci_dagster.common.redact import Redactor
from mlci_dagster.notify.message import Kind, Notification, summary_lines
from mlci_dagster.notify.transport import host_of, request_json

ICONS = {Kind.SIGNATURE: ":red_circle:", Kind.SPREAD: ":red_circle:",
         Kind.RESOLVED: ":large_green_circle:", Kind.REGRESSION: ":rotating_light:",
         Kind.CULPRIT: ":mag:", Kind.QUARANTINE: ":construction:"}
SECTION_CHARS = 2900  # Slack caps a section's text at 3000 characters


def escape(text: str) -> str:
    """Slack mrkdwn needs only &, < and > escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(notification: Notification) -> dict[str, Any]:
    n = notification
    text = f"{ICONS[n.kind]} mlci: {n.title}"
    facts = "\n".join(f"*{label}:* {escape(value)}" for label, value in summary_lines(n))
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": escape(text)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": facts[:SECTION_CHARS]}},
    ]
    if n.error_summary:
        summary = escape(n.error_summary.replace("```", "'''"))
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": f"*error summary:*\n```{summary[-SECTION_CHARS:]}```"}})
    links = [f"<{url}|{label}>" if url.startswith(("http://", "https://"))
             else f"{label}: `{escape(url)}`" for label, url in n.links().items()]
    if links:
        blocks.append({"type": "context",
                       "elements": [{"type": "mrkdwn", "text": " · ".join(links)}]})
    return {"text": text, "blocks": blocks}


@dataclass
class Webhook:
    """Posts to one webhook URL; a token, when set, goes only in the Authorization header."""

    url: str
    token: str = ""

    def post(self, notification: Notification) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request_json("POST", self.url, what="webhook", headers=headers,
                     body=slack_payload(notification), shown_url=host_of(self.url),
                     redactor=Redactor([self.token, self.url]))
