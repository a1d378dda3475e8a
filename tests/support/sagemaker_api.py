"""SageMaker on loopback for tests, benchmarks and the loopback example runs, on moto's server
(tests/support/aws_proxy.py starts it): fake credentials for the standard AWS chain, the answers
`invoke_endpoint` gives, what the region holds with the mlci tags (`tagged_resources`, through
boto3), and `PacedSageMaker`, a proxy in front of moto that gives its endpoints the clock real
ones have.

moto's endpoints are InService the moment they are created and gone the moment they are deleted
(moto 5.2.6, the installed package: `moto/sagemaker/models.py`, `FakeEndpoint.__init__` and
`SageMakerModelBackend.delete_endpoint`); real ones are Creating, then Deleting, for minutes.
The proxy forwards every request to moto unchanged and keeps only that clock (`EndpointClock`,
apart from the wire format): DescribeEndpoint and ListEndpoints answer `Creating` for
`create_s` after CreateEndpoint, and a DeleteEndpoint is answered at once but reaches moto
`delete_s` later, the endpoint `Deleting` meanwhile (a second DeleteEndpoint of it is accepted
and changes nothing). It also answers GET `<anything>/slow` itself after `slow_s`: a stand-in
for a slow route of a UI in front of the endpoint, which SageMaker does not have. Not emulated:
Failed or OutOfService endpoints, updates, the runtime's own errors.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import requests

from mlci_dagster.providers.aws.diagnose import NAME_PREFIX, RUN_TAG
from tests.support.aws_proxy import FAKE_CREDENTIALS, REGION

ROLE = "arn:aws:iam::123456789012:role/mlci-sagemaker"
SLOW_PATH = "/slow"
HOP_BY_HOP = {"connection", "content-length", "host", "transfer-encoding", "keep-alive"}


def queue_invocation_results(url: str, *bodies: Any) -> None:
    """moto's documented way to choose what `invoke_endpoint` answers, in order."""
    results = [{"Body": json.dumps(b) if not isinstance(b, str) else b,
                "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic",
                "CustomAttributes": ""} for b in bodies]
    requests.post(f"{url}/moto-api/static/sagemaker/endpoint-results",
                  json={"results": results}, timeout=10).raise_for_status()


def tagged_resources(url: str, region: str = REGION, run_id: str | None = None) -> list[str]:
    """`<kind>/<name>` of every model, endpoint config and endpoint named `mlci-…` and tagged
    `mlci:run-id` (equal to `run_id`, if given), as boto3 lists them (with the fake
    credentials: this asks moto)."""
    client = boto3.client("sagemaker", endpoint_url=url, region_name=region,
                          aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    found = []
    for kind, method, items, name_key, arn_key in (
            ("model", client.list_models, "Models", "ModelName", "ModelArn"),
            ("endpoint-config", client.list_endpoint_configs, "EndpointConfigs",
             "EndpointConfigName", "EndpointConfigArn"),
            ("endpoint", client.list_endpoints, "Endpoints", "EndpointName", "EndpointArn")):
        for item in method(NameContains=NAME_PREFIX, MaxResults=100)[items]:
            with contextlib.suppress(client.exceptions.ClientError):  # deleted meanwhile
                tags = {t["Key"]: t["Value"] for t in
                        client.list_tags(ResourceArn=item[arn_key])["Tags"]}
                if RUN_TAG in tags and run_id in (None, tags[RUN_TAG]):
                    found.append(f"{kind}/{item[name_key]}")
    return found


# --- the endpoints' clock ------------------------------------------------------------------


@dataclass
class EndpointClock:
    """When each endpoint was created and since when it is being deleted; what status that
    makes it, whatever moto says."""

    create_s: float
    delete_s: float
    created_at: dict[str, float] = field(default_factory=dict)
    deleting_since: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def created(self, name: str) -> None:
        with self.lock:
            self.created_at[name] = time.monotonic()

    def start_deleting(self, name: str) -> bool:
        """Marks it Deleting; False if it already was."""
        with self.lock:
            if name in self.deleting_since:
                return False
            self.deleting_since[name] = time.monotonic()
            return True

    def deleted(self, name: str) -> None:
        with self.lock:
            self.deleting_since.pop(name, None)
            self.created_at.pop(name, None)

    def status(self, name: str, reported: str) -> str:
        with self.lock:
            if name in self.deleting_since:
                return "Deleting"
            if time.monotonic() - self.created_at.get(name, float("-inf")) < self.create_s:
                return "Creating"
            return reported


class PacedSageMaker:
    """The proxy on 127.0.0.1 at a free port in front of moto at `moto_url`: `with
    PacedSageMaker(url, create_s=4, delete_s=4) as api:` then `api.url` is the endpoint URL
    boto3 and the registry use."""

    def __init__(self, moto_url: str, create_s: float = 4.0, delete_s: float = 4.0,
                 slow_s: float = 8.0) -> None:
        self.moto_url = moto_url.rstrip("/")
        self.clock = EndpointClock(create_s, delete_s)
        self.slow_s = slow_s
        self._timers: list[threading.Timer] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> PacedSageMaker:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for timer in self._timers:
            timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # --- wire format -----------------------------------------------------------------------

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes
                ) -> requests.Response:
        return requests.request(method, self.moto_url + path, data=body, timeout=30,
                                headers={k: v for k, v in headers.items()
                                         if k.lower() not in HOP_BY_HOP})

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET" and path.endswith(SLOW_PATH):
            time.sleep(self.slow_s)
            return 200, {"Content-Type": "text/plain"}, b"ok"
        target = headers.get("X-Amz-Target", "")
        action = target.removeprefix("SageMaker.") if target.startswith("SageMaker.") else ""
        name = json.loads(body or b"{}").get("EndpointName", "") if action else ""
        if action == "DeleteEndpoint":
            return self._delete_later(path, headers, body, name)
        response = self.forward(method, path, headers, body)
        reply_headers = {k: v for k, v in response.headers.items()
                         if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        content = response.content
        if response.ok and action == "CreateEndpoint":
            self.clock.created(name)
        elif response.ok and action == "DescribeEndpoint":
            described = response.json()
            described["EndpointStatus"] = self.clock.status(name, described["EndpointStatus"])
            content = json.dumps(described).encode()
        elif response.ok and action == "ListEndpoints":
            listed = response.json()
            for item in listed.get("Endpoints", []):
                item["EndpointStatus"] = self.clock.status(item["EndpointName"],
                                                           item["EndpointStatus"])
            content = json.dumps(listed).encode()
        return response.status_code, reply_headers, content

    def _delete_later(self, path: str, headers: dict[str, str], body: bytes, name: str
                      ) -> tuple[int, dict[str, str], bytes]:
        """Accepts the delete if moto knows the endpoint (else moto's own error) and sends it
        to moto `delete_s` later."""
        probe = self.forward("POST", path, {**headers, "X-Amz-Target":
                                            "SageMaker.DescribeEndpoint"}, body)
        if not probe.ok:
            return probe.status_code, {"Content-Type": probe.headers.get(
                "Content-Type", "application/x-amz-json-1.1")}, probe.content
        if self.clock.start_deleting(name):
            def delete() -> None:
                with contextlib.suppress(requests.RequestException):
                    self.forward("POST", path, headers, body)
                self.clock.deleted(name)

            timer = threading.Timer(self.clock.delete_s, delete)
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        return 200, {"Content-Type": "application/x-amz-json-1.1"}, b"{}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    status, headers, content = proxy.handle(
                        self.command, self.path, dict(self.headers.items()), body)
                except requests.RequestException as exc:
                    status, headers = 502, {"Content-Type": "text/plain"}
                    content = f"moto did not answer: {exc}".encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 (the http.server hooks)

            def handle(self) -> None:
                with contextlib.suppress(ConnectionError):  # a client killed mid-request
                    super().handle()

            def log_message(self, *args: object) -> None:
                pass

        return Handler
