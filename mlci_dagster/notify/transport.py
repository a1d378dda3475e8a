"""JSON over HTTP for the notification channels, with errors that say what failed and never
carry a token (a webhook URL is shown by its host only: its path is often the secret)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests

from mlci_dagster.common.redact import Redactor

TIMEOUT_S = 10.0
BODY_IN_ERROR_CHARS = 300


class NotifyError(Exception):
    """A channel could not deliver a notification; the message names the channel and call."""


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "(no URL)"


def request_json(
    method: str, url: str, *, what: str, headers: dict[str, str], redactor: Redactor,
    body: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
    shown_url: str | None = None, timeout_s: float = TIMEOUT_S,
) -> requests.Response:
    """Sends one request; NotifyError on a network error or a non-2xx answer."""
    shown = shown_url or url
    try:
        response = requests.request(method, url, json=body, params=params, headers=headers,
                                    timeout=timeout_s)
    except requests.RequestException as exc:
        raise NotifyError(redactor.text(f"{what}: {method} {shown}: {type(exc).__name__}: {exc}")
                          ) from None
    if not 200 <= response.status_code < 300:
        raise NotifyError(redactor.text(
            f"{what}: {method} {shown}: HTTP {response.status_code}: "
            f"{response.text[:BODY_IN_ERROR_CHARS]}"))
    return response
