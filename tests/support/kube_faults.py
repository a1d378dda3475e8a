"""Faults the Kubernetes API emulator (tests/support/kube_wire.py) answers on request, with the
status, headers and body a real API server sends: throttling (429), server errors (500, 503,
504) and connection resets. `KubeApiServer.inject` takes a `Fault`; the handler asks
`FaultPlan.take` before it routes a request.

What a real server sends (kubernetes/kubernetes, staging/src/k8s.io/):
- 429 from API Priority and Fairness and the max-in-flight filter
  (`apiserver/pkg/server/filters/maxinflight.go` tooManyRequests, which
  `priority-and-fairness.go` calls too): `Retry-After: 1` and a plain-text body, "Too many
  requests, please try again later." (`plain=True`; APF adds the X-Kubernetes-PF-* headers).
- 429 as a Status (`apimachinery/pkg/api/errors` NewTooManyRequests, as the watch cache answers
  while it initialises: "storage is (re)initializing", 1): reason TooManyRequests,
  `details.retryAfterSeconds`; `apiserver/pkg/endpoints/handlers/responsewriters`
  ErrorNegotiated sets `Retry-After` from it.
- 500 InternalError (NewInternalError: "Internal error occurred: <cause>", the cause again in
  `details.causes`), 503 ServiceUnavailable (NewServiceUnavailable: no details), 504 Timeout
  (NewTimeoutError, as the request timeout filter answers: "Timeout: request did not complete
  within requested timeout - context deadline exceeded"); with `retry_after`, each carries
  `details.retryAfterSeconds` and the header.
- A connection reset: the server drops the connection without an answer (`reset=True`), as a
  restarting API server or a load balancer in front of it does.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

THROTTLED_TEXT = "Too many requests, please try again later.\n"
DEFAULT_MESSAGES = {
    429: "storage is (re)initializing",
    500: "Internal error occurred: etcdserver: request timed out",
    503: "the server is currently unable to handle the request",
    504: "Timeout: request did not complete within requested timeout - context deadline exceeded",
}
REASONS = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
           504: "Timeout"}
# The UIDs APF names the matched FlowSchema and priority level by (flowcontrol/v1 types.go).
APF_HEADERS = {"X-Kubernetes-PF-FlowSchema-UID": "6c1ba4a1-6d6a-4b34-9c1e-3f1b6a0c2d11",
               "X-Kubernetes-PF-PriorityLevel-UID": "0f3a52d2-7b27-4d4c-bd0a-8e5c1f2a9b07"}


@dataclass
class Fault:
    """Answer the next `count` requests (None: every one, until cleared) whose method is one of
    `methods` (None: any) and whose percent-decoded path matches `path_regex` (None: any) with
    `status` (429, 500, 503 or 504), or drop their connection (`reset`). `answered` counts
    them."""

    status: int | None = None
    count: int | None = 1
    retry_after: int | None = None
    methods: frozenset[str] | None = None
    path_regex: str | None = None
    plain: bool = False
    message: str | None = None
    reset: bool = False
    answered: int = 0
    _path: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.reset == (self.status is not None):
            raise ValueError("a fault is either a status or a reset")
        if self.status is not None and self.status not in REASONS:
            raise ValueError(f"status {self.status}: faults answer {sorted(REASONS)}")
        if self.count is not None and self.count < 1:
            raise ValueError("count: at least 1, or None for every request")
        if self.plain and self.status != 429:
            raise ValueError("plain (APF's text body) is a 429's")
        if self.methods is not None:
            self.methods = frozenset(m.upper() for m in self.methods)
        self._path = re.compile(self.path_regex) if self.path_regex is not None else None

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method.upper() in self.methods) and (
            self._path is None or self._path.search(path) is not None)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) as the server writes them."""
        assert self.status is not None
        headers: dict[str, str] = {}
        if self.plain:
            headers |= {"Content-Type": "text/plain; charset=utf-8",
                        "X-Content-Type-Options": "nosniff", **APF_HEADERS,
                        "Retry-After": str(1 if self.retry_after is None else self.retry_after)}
            return 429, headers, THROTTLED_TEXT.encode()
        retry_after = self.retry_after if self.retry_after is not None else (
            1 if self.status == 429 else 0)
        message = self.message or DEFAULT_MESSAGES[self.status]
        details: dict[str, Any] | None = {}
        if self.status == 500:
            cause = message.removeprefix("Internal error occurred: ")
            details = {"causes": [{"message": cause}]}
        elif self.status == 503:
            details = None
        if retry_after > 0:
            details = {**(details or {}), "retryAfterSeconds": retry_after}
            headers["Retry-After"] = str(retry_after)
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": REASONS[self.status],
                **({} if details is None else {"details": details}), "code": self.status}
        headers["Content-Type"] = "application/json"
        return self.status, headers, json.dumps(body).encode()


class FaultPlan:
    """The faults a server holds, first added first asked; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The fault that answers this request (counted), if any."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.answered += 1
                    if fault.count is not None and fault.answered >= fault.count:
                        self._faults.remove(fault)
                    return fault
        return None
