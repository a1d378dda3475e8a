"""GitHub through the REST API: one issue per failure signature (found by its label and the
signature id its title ends with; opened when the signature is new, commented on when it spreads
or its partitions regress, commented and closed when it is resolved), and one commit status per
SHA and tier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlci_dagster.common.redact import Redactor
from mlci_dagster.notify.message import Kind, Notification, summary_lines
from mlci_dagster.notify.transport import NotifyError, request_json

DEFAULT_API_URL = "https://api.github.com"
LABEL = "mlci"
PAGE_SIZE = 100
MAX_PAGES = 20


TITLE_CHARS = 200


def issue_title(signature: str, text: str) -> str:
    """The title of a signature's issue; its end, `[<id>]`, makes it findable."""
    head = f"mlci: {text}"
    room = TITLE_CHARS - len(signature) - 3
    return f"{head if len(head) <= room else head[:room - 1] + '…'} [{signature}]"


def issue_markdown(notification: Notification) -> str:
    n = notification
    lines = [f"**{n.title}**", ""]
    lines += [f"- **{label}:** `{value}`" if label in ("image", "run") else
              f"- **{label}:** {value}" for label, value in summary_lines(n)]
    if n.error_summary:
        fence = "````" if "```" in n.error_summary else "```"
        lines += ["", "Error summary (redacted):", "", fence, n.error_summary, fence]
    links = n.links()
    if links:
        lines += [""] + [f"- [{label}]({url})" if url.startswith(("http://", "https://"))
                         else f"- {label}: `{url}`" for label, url in links.items()]
    lines += ["", f"<!-- mlci-notification: {n.key} -->"]
    return "\n".join(lines)


@dataclass
class GitHubClient:
    """The REST API of `repo` ("owner/name"); `api_url` for GitHub Enterprise."""

    repo: str
    token: str
    api_url: str = DEFAULT_API_URL

    def __post_init__(self) -> None:
        if self.repo.count("/") != 1 or not all(self.repo.split("/")):
            raise NotifyError(f"github: repo '{self.repo}': expected 'owner/name'")
        self._redactor = Redactor([self.token])

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "mlci-dagster"}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None) -> Any:
        url = f"{self.api_url.rstrip('/')}/repos/{self.repo}{path}"
        response = request_json(method, url, what="github", headers=self._headers, body=body,
                                params=params, redactor=self._redactor)
        return response.json() if response.content else None


@dataclass
class GitHubStatuses(GitHubClient):
    """Commit statuses of `repo`: GitHub keeps the latest per (SHA, context)."""

    def set_status(self, sha: str, state: str, context: str, description: str,
                   target_url: str) -> None:
        self._call("POST", f"/statuses/{sha}", body={
            "state": state, "context": context, "description": description,
            "target_url": target_url})


@dataclass
class GitHubIssues(GitHubClient):
    """The issues of `repo` labelled `mlci`."""

    def find_open_issue(self, signature: str) -> int | None:
        """The number of the signature's open issue, if any (pull requests are not issues)."""
        for page in range(1, MAX_PAGES + 1):
            issues = self._call("GET", "/issues", params={
                "state": "open", "labels": LABEL, "per_page": PAGE_SIZE, "page": page})
            for issue in issues:
                if str(issue.get("title", "")).endswith(f"[{signature}]") and \
                        "pull_request" not in issue:
                    return int(issue["number"])
            if len(issues) < PAGE_SIZE:
                return None
        return None

    def open_or_comment(self, notification: Notification) -> int:
        """Comments on the signature's open issue, or opens it: one issue per signature."""
        number = self.find_open_issue(notification.signature)
        body = issue_markdown(notification)
        if number is None:
            issue = self._call("POST", "/issues", body={
                "title": issue_title(notification.signature, notification.signature_text),
                "body": body, "labels": [LABEL]})
            return int(issue["number"])
        self._call("POST", f"/issues/{number}/comments", body={"body": body})
        return number

    def comment_and_close(self, notification: Notification) -> int | None:
        """Once resolved: comments on the signature's open issue and closes it; None if none."""
        number = self.find_open_issue(notification.signature)
        if number is None:
            return None
        self._call("POST", f"/issues/{number}/comments", body={"body": issue_markdown(
            notification)})
        self._call("PATCH", f"/issues/{number}", body={"state": "closed",
                                                       "state_reason": "completed"})
        return number

    def deliver(self, notification: Notification) -> int | None:
        """On the signature's issue; nothing for a notification of no signature."""
        if not notification.signature:
            return None
        if notification.kind is Kind.RESOLVED:
            return self.comment_and_close(notification)
        return self.open_or_comment(notification)
