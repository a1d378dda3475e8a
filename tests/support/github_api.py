"""A loopback HTTP server that answers like GitHub's REST API (issues: list, create, comment,
close; commit statuses: create), like a Slack-compatible webhook, and like an OpenAI-compatible
chat completions endpoint (POST /v1/chat/completions: `choices[0].message.content`, which here
names the signature the request's evidence carried), recording every request. It emulates only
those calls and their JSON shapes: no pagination beyond one page, no rate limits, no checks
API, a single repository and token, no model behind the completions."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

GITHUB_TOKEN = "ghp-0a1b2c3d4e5f6a7b8c9d"
REPO = "acme/platform"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeServices:
    """A webhook at /hook, and GitHub's issue and commit status API under /api, in memory."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)
    comments: dict[int, list[str]] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)  # commit statuses, in order
    fail_statuses: int = 0  # answer the next N commit status posts with 502
    fail_webhook: int = 0  # answer the next N webhook posts with 500

    def of(self, method: str, path_part: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    @property
    def hooks(self) -> list[dict[str, Any]]:
        return [r.body for r in self.of("POST", "/hook")]

    @property
    def completions(self) -> list[Recorded]:
        return self.of("POST", "/v1/chat/completions")


def make_handler(services: FakeServices) -> type[BaseHTTPRequestHandler]:
    issues_path = f"/api/repos/{REPO}/issues"
    statuses_path = f"/api/repos/{REPO}/statuses/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest's output clean
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            services.requests.append(Recorded(self.command, url.path, parse_qs(url.query),
                                              dict(self.headers), body))
            if url.path == "/v1/chat/completions":
                evidence = json.loads(body["messages"][-1]["content"])
                changed = ", ".join(evidence["changes"]["changed"]) or "nothing"
                answer = (f"Likely cause of {evidence['signature']}: the step that diverges; "
                          f"check what changed ({changed}).")
                return self._answer(200, {"object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant",
                                                                   "content": answer}}]})
            if url.path == "/hook":
                if services.fail_webhook:
                    services.fail_webhook -= 1
                    return self._answer(500, {"error": "down"})
                return self._answer(200, {"ok": True})
            if self.headers.get("Authorization") != f"Bearer {GITHUB_TOKEN}":
                return self._answer(401, {"message": "Bad credentials"})
            if self.command == "POST" and url.path.startswith(statuses_path):
                if services.fail_statuses:
                    services.fail_statuses -= 1
                    return self._answer(502, {"message": "Server Error"})
                status = {"sha": url.path.removeprefix(statuses_path), **body}
                services.statuses.append(status)
                return self._answer(201, status)
            rest = url.path.removeprefix(issues_path)
            if self.command == "GET" and rest == "":
                query = parse_qs(url.query)
                listed = [i for i in services.issues.values()
                          if i["state"] == query["state"][0]
                          and query["labels"][0] in i["labels"]]
                return self._answer(200, listed)
            if self.command == "POST" and rest == "":
                number = len(services.issues) + 1
                services.issues[number] = {"number": number, "state": "open", **body}
                services.comments[number] = []
                return self._answer(201, services.issues[number])
            number = int(rest.strip("/").split("/")[0])
            if self.command == "POST" and rest.endswith("/comments"):
                services.comments[number].append(body["body"])
                return self._answer(201, {"id": len(services.comments[number])})
            if self.command == "PATCH":
                services.issues[number].update(body)
                return self._answer(200, services.issues[number])
            return self._answer(404, {"message": "Not Found"})

        do_GET = do_POST = do_PATCH = _handle

    return Handler


@contextlib.contextmanager
def serve_fake_services() -> Iterator[FakeServices]:
    state = FakeServices()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
