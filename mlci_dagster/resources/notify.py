"""The notifier resource: where failures and regressions are announced (a Slack-compatible
webhook, GitHub issues). Secrets come only from the environment, through `dg.EnvVar`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import dagster as dg

from mlci_dagster.common.redact import Redactor
from mlci_dagster.notify import GitHubIssues, Notifier, Webhook
from mlci_dagster.notify.github import DEFAULT_API_URL, GitHubStatuses
from mlci_dagster.notify.rootcause import ChatCompletionsAnalyzer

# field -> the environment variable it is read from when set
ENV_VARS = {
    "webhook_url": "MLCI_WEBHOOK_URL",
    "webhook_token": "MLCI_WEBHOOK_TOKEN",
    "github_repo": "MLCI_GITHUB_REPO",
    "github_token": "MLCI_GITHUB_TOKEN",
    "github_api_url": "MLCI_GITHUB_API_URL",
}


class NotifierResource(dg.ConfigurableResource):
    """A webhook (with an optional bearer token) and a GitHub repository for one issue per
    failing partition; either or both may be left empty, and with neither it is disabled."""

    webhook_url: str = ""
    webhook_token: str = ""
    github_repo: str = ""
    github_token: str = ""
    github_api_url: str = DEFAULT_API_URL

    def notifier(self) -> Notifier:
        """The Dagster-free notifier; NotifyError if the GitHub repository is malformed."""
        webhook = Webhook(self.webhook_url, self.webhook_token) if self.webhook_url else None
        github = (GitHubIssues(self.github_repo, self.github_token,
                               self.github_api_url or DEFAULT_API_URL)
                  if self.github_repo and self.github_token else None)
        return Notifier(webhook, github)

    def commit_statuses(self) -> GitHubStatuses | None:
        """The GitHub commit statuses of the repository; None when GitHub is not configured."""
        if not (self.github_repo and self.github_token):
            return None
        return GitHubStatuses(self.github_repo, self.github_token,
                              self.github_api_url or DEFAULT_API_URL)


def notifier_resource() -> NotifierResource:
    """Built from the environment: each field set is an EnvVar (so no value is stored in a run's
    config or snapshot); with none set, a disabled notifier."""
    return NotifierResource(**{name: dg.EnvVar(var) for name, var in ENV_VARS.items()
                               if os.environ.get(var)})


class RootCauseResource(dg.ConfigurableResource):
    """An OpenAI-compatible chat completions endpoint that suggests a cause for each new
    failure signature: off unless `url` (its base, e.g. https://api.openai.com/v1) and `model`
    are set; the key only ever from the environment."""

    url: str = ""
    model: str = ""
    key: str = ""

    def analyzer(self, secret_names: Sequence[str]) -> ChatCompletionsAnalyzer | None:
        """The analyzer, masking the registry's secrets (and the key) in what it sends."""
        if not (self.url and self.model):
            return None
        return ChatCompletionsAnalyzer(self.url, self.model, self.key,
                                       Redactor.from_env(secret_names))


ROOT_CAUSE_ENV = {"url": "MLCI_RCA_URL", "model": "MLCI_RCA_MODEL", "key": "MLCI_RCA_KEY"}


def root_cause_resource() -> RootCauseResource:
    """From the environment, as EnvVars; with none set, no analyzer."""
    return RootCauseResource(**{name: dg.EnvVar(var) for name, var in ROOT_CAUSE_ENV.items()
                                if os.environ.get(var)})
