"""A loopback emulation of the Cloud TPU v2 REST API for tests, so `google-cloud-tpu`'s REST
transport runs unmodified (plain HTTP: an `http://` api_endpoint keeps its scheme), and a real
`sshd` on loopback to stand in for a TPU VM's SSH server.

`TpuState` is the state (nodes and long-running operations per project and zone, advanced by the
clock); `TpuApiServer` is the wire format on top of it (the paths of
`tpu_v2/services/tpu/transports/rest_base.py`, camelCase JSON, `@type`d operation metadata and
responses, Google's JSON error body `{"error": {code, message, status}}`).

Emulated: `projects/{p}/locations/{z}/nodes` create (`?nodeId=`, returns an Operation that is
done after `create_s`; the node is CREATING until then, READY after), get, list (`pageSize`,
`pageToken`; a `filter` on labels, `labels.KEY=VALUE` joined by AND, though the client sends
none), delete (an Operation; the node is DELETING until it is gone after `delete_s`),
`operations/{id}` get; 404 NOT_FOUND, 409 ALREADY_EXISTS, 400 INVALID_ARGUMENT for a bad node
id, a missing acceleratorType or runtimeVersion, or labels GCP would refuse. Each node's
`networkEndpoints[0]` is `ipAddress` 127.0.0.1 (or `endpoint_ip`) and port 8470, as on a real
TPU VM: the SSH port is not in the API (with `networkConfig.enableExternalIps`, its
`accessConfig.externalIp` is the same address). Test hooks: `preempt(node)` (state PREEMPTED),
`fail_next_create(message)` (the next create's Operation ends with an error), `requests`;
`listed_nodes` asks the API, through `google-cloud-tpu`, which nodes carry the mlci labels.

Not emulated: authentication (any or no credentials), IAM, quotas and stockouts, queued
resources, start/stop/update/guest attributes, accelerator types and runtime versions as
catalogues (any value is accepted), `networkConfig` and external IPs, health and symptoms,
operation cancel/list/delete, field masks, the gRPC transport. A preempted node stays
reachable over SSH (a real one is gone): the provider must notice from the API's state.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

from mlci_dagster.providers.ports import allocate_free_port

OPERATION_METADATA = "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"
NODE_TYPE = "type.googleapis.com/google.cloud.tpu.v2.Node"
EMPTY_TYPE = "type.googleapis.com/google.protobuf.Empty"
NODE_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
TPU_RUNTIME_PORT = 8470
STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
          500: "INTERNAL"}


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Node:
    name: str  # projects/{p}/locations/{z}/nodes/{id}
    body: dict[str, Any]  # as created: acceleratorType, runtimeVersion, labels, ...
    created_at: float
    ready_at: float
    numeric_id: int
    state: str = "CREATING"
    gone_at: float | None = None  # set by delete

    def to_json(self, endpoint_ip: str) -> dict[str, Any]:
        endpoint: dict[str, Any] = {"ipAddress": endpoint_ip, "port": TPU_RUNTIME_PORT}
        if (self.body.get("networkConfig") or {}).get("enableExternalIps"):
            endpoint["accessConfig"] = {"externalIp": endpoint_ip}
        return {**self.body, "name": self.name, "state": self.state, "id": str(self.numeric_id),
                "createTime": _timestamp(self.created_at), "apiVersion": "V2",
                "networkEndpoints": [endpoint]}


@dataclass
class Operation:
    name: str
    verb: str
    target: str
    created_at: float
    done_at: float
    error: str | None = None
    response: dict[str, Any] | None = None  # filled when done


@dataclass
class TpuState:
    """Nodes and operations, advanced lazily by the clock on every read."""

    create_s: float = 0.3
    delete_s: float = 0.3
    endpoint_ip: str = "127.0.0.1"
    nodes: dict[str, Node] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    _failing_create: str | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(7_000_000_000_000))
    lock: threading.RLock = field(default_factory=threading.RLock)

    def _advance(self) -> None:
        now = time.time()
        for name, node in list(self.nodes.items()):
            if node.gone_at is not None and now >= node.gone_at:
                del self.nodes[name]
            elif node.state == "CREATING" and now >= node.ready_at:
                node.state = "READY"
        for op in self.operations.values():
            if op.response is None and op.error is None and now >= op.done_at:
                node = self.nodes.get(op.target)
                op.response = ({"@type": NODE_TYPE, **node.to_json(self.endpoint_ip)}
                               if op.verb == "create" and node else {"@type": EMPTY_TYPE})

    def _operation(self, parent: str, verb: str, target: str, after_s: float,
                   error: str | None = None) -> Operation:
        now = time.time()
        op = Operation(f"{parent}/operations/operation-{uuid.uuid4().hex[:16]}", verb, target,
                       now, now + after_s, error)
        self.operations[op.name] = op
        return op

    def create(self, parent: str, node_id: str, body: dict[str, Any]) -> Operation:
        with self.lock:
            self._advance()
            if not NODE_ID.fullmatch(node_id or ""):
                raise ApiError(400, f"nodeId {node_id!r} must match {NODE_ID.pattern}")
            for required in ("acceleratorType", "runtimeVersion"):
                if not body.get(required):
                    raise ApiError(400, f"node.{required} is required")
            for key, value in (body.get("labels") or {}).items():
                if not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
                    raise ApiError(400, f"invalid label {key}={value!r}: keys and values are "
                                        "lowercase letters, digits, '_' and '-', at most 63")
            name = f"{parent}/nodes/{node_id}"
            if name in self.nodes:
                raise ApiError(409, f"node {name} already exists")
            error, self._failing_create = self._failing_create, None
            now = time.time()
            if error is None:
                self.nodes[name] = Node(name, body, now, now + self.create_s, next(self._ids))
            return self._operation(parent, "create", name, self.create_s, error)

    def get(self, name: str) -> Node:
        with self.lock:
            self._advance()
            if name not in self.nodes:
                raise ApiError(404, f"node {name} not found")
            return self.nodes[name]

    def list(self, parent: str, labels: dict[str, str]) -> list[Node]:
        with self.lock:
            self._advance()
            return [n for name, n in sorted(self.nodes.items())
                    if name.startswith(f"{parent}/nodes/")
                    and all((n.body.get("labels") or {}).get(k) == v for k, v in labels.items())]

    def delete(self, name: str) -> Operation:
        with self.lock:
            node = self.get(name)
            if node.gone_at is None:
                node.state, node.gone_at = "DELETING", time.time() + self.delete_s
            return self._operation(name.rsplit("/nodes/", 1)[0], "delete", name, self.delete_s)

    def operation(self, name: str) -> Operation:
        with self.lock:
            self._advance()
            if name not in self.operations:
                raise ApiError(404, f"operation {name} not found")
            return self.operations[name]

    # --- test hooks ------------------------------------------------------------------------

    def preempt(self, node: str) -> None:
        """The node (its full name or id) is reclaimed: state PREEMPTED."""
        with self.lock:
            self._advance()
            matches = [n for name, n in self.nodes.items()
                       if name == node or name.endswith(f"/nodes/{node}")]
            if not matches:
                raise KeyError(node)
            matches[0].state = "PREEMPTED"

    def fail_next_create(self, message: str) -> None:
        with self.lock:
            self._failing_create = message


def listed_nodes(api_url: str, project: str, zone: str, run_id: str | None = None
                 ) -> list[str]:
    """The ids of the nodes in the zone labelled `mlci-run-id` (equal to `run_id`, if given),
    as `google-cloud-tpu`'s `list_nodes` reports them."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import tpu_v2

    client = tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(),
                              client_options=ClientOptions(api_endpoint=api_url))
    return [node.name.rsplit("/", 1)[-1] for node in client.list_nodes(
                parent=f"projects/{project}/locations/{zone}", timeout=10)
            if "mlci-run-id" in node.labels and run_id in (None, node.labels["mlci-run-id"])]


class TpuApiServer:
    """The wire format over a TpuState, on 127.0.0.1 at a free port: `with TpuApiServer() as
    api:` then `api.url`, `api.state`, `api.requests` ([(method, path)])."""

    def __init__(self, state: TpuState | None = None) -> None:
        self.state = state or TpuState()
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def preempt(self, node: str) -> None:
        self.state.preempt(node)

    def start(self) -> TpuApiServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> TpuApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- wire format -----------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]
              ) -> dict[str, Any]:
        state = self.state
        if match := re.fullmatch(r"/v2/(projects/[^/]+/locations/[^/]+)/nodes", path):
            parent = match.group(1)
            if method == "POST":
                return self._operation_json(state.create(parent, query.get("nodeId", ""),
                                                         body))
            if method == "GET":
                return self._list_json(parent, query)
        if re.fullmatch(r"/v2/projects/[^/]+/locations/[^/]+/nodes/[^/:]+", path):
            name = path[len("/v2/"):]
            if method == "GET":
                return state.get(name).to_json(state.endpoint_ip)
            if method == "DELETE":
                return self._operation_json(state.delete(name))
        if method == "GET" and re.fullmatch(
                r"/v2/projects/[^/]+/locations/[^/]+/operations/[^/:]+", path):
            return self._operation_json(state.operation(path[len("/v2/"):]))
        raise ApiError(404, f"no route {method} {path} in this emulation")

    def _list_json(self, parent: str, query: dict[str, str]) -> dict[str, Any]:
        labels = dict(re.findall(r"labels\.([a-z0-9_-]+)\s*[:=]\s*\"?([a-z0-9_-]*)\"?",
                                 query.get("filter", "")))
        nodes = self.state.list(parent, labels)
        size = int(query.get("pageSize") or 0) or len(nodes) or 1
        start = int(query.get("pageToken") or 0)
        page = nodes[start:start + size]
        reply: dict[str, Any] = {"nodes": [n.to_json(self.state.endpoint_ip) for n in page]}
        if start + size < len(nodes):
            reply["nextPageToken"] = str(start + size)
        return reply

    def _operation_json(self, op: Operation) -> dict[str, Any]:
        with self.state.lock:
            self.state._advance()
            done = op.response is not None or (op.error is not None
                                               and time.time() >= op.done_at)
            reply: dict[str, Any] = {
                "name": op.name, "done": done,
                "metadata": {"@type": OPERATION_METADATA, "createTime": _timestamp(op.created_at),
                             "target": op.target, "verb": op.verb, "apiVersion": "v2"}}
            if done and op.error is not None:
                reply["error"] = {"code": 13, "message": op.error}
            elif done:
                reply["response"] = op.response
            return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                url = urlsplit(self.path)
                server.requests.append((self.command, url.path))
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                    self._reply(200, server.route(self.command, url.path, query, body))
                except ApiError as exc:
                    self._reply(exc.code, {"error": {
                        "code": exc.code, "message": exc.message,
                        "status": STATUS.get(exc.code, "UNKNOWN")}})
                except (ValueError, KeyError) as exc:
                    self._reply(400, {"error": {"code": 400, "message": str(exc),
                                                "status": "INVALID_ARGUMENT"}})

            do_GET = do_POST = do_DELETE = _serve  # noqa: N815 (the http.server hooks)

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


# --- a real sshd on loopback ---------------------------------------------------------------

SSHD = Path("/usr/sbin/sshd")
# Where the gcp-tpu-vm provider's remote shells note their process group (/tmp on the VM).
REMOTE_PGID_GLOB = "mlci-*.pgid"
# What pipelines on the "VM" leave under /tmp (the TPU example's test reports), which a real
# VM takes with it.
REMOTE_LEFT_GLOB = "mlci-*-reports"


def sshd_available() -> bool:
    return SSHD.is_file() and shutil.which("ssh-keygen") is not None


@dataclass
class LoopbackSshd:
    """`/usr/sbin/sshd -D` on 127.0.0.1 with a throwaway host key, accepting one throwaway user
    key for the current user (its private key, OpenSSH format, in `private_key`)."""

    directory: Path
    port: int = 0
    user: str = ""
    private_key: str = ""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = float("inf")  # none of the VM's files are its own until it starts

    def start(self, timeout_s: float = 10.0) -> LoopbackSshd:
        import getpass

        self.directory.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        self.user = getpass.getuser()
        host_key, user_key = self.directory / "host_ed25519", self.directory / "user_ed25519"
        for key in (host_key, user_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                               check=True)
        authorized = self.directory / "authorized_keys"
        authorized.write_text(user_key.with_suffix(".pub").read_text())
        self.private_key = user_key.read_text()
        self.port = allocate_free_port()
        config = self.directory / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}", f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}", f"PidFile {self.directory / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin yes", "AllowTcpForwarding no", "X11Forwarding no",
            "PrintMotd no", "LogLevel ERROR",
            # As a VM's sshd (Ubuntu's default config names it): test reports come back by SFTP.
            "Subsystem sftp internal-sftp", "",
        ]))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        log = open(self.directory / "sshd.log", "ab")  # noqa: SIM115 (kept open by the child)
        self.process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config), "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        import socket

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited {self.process.returncode}: "
                                   f"{(self.directory / 'sshd.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port} in {timeout_s:g}s")

    def stop(self) -> None:
        """Stops the listener and every session it forked (commands still running on the
        "VM" among them: they go with it, as with a real VM, and so do the process-group files
        their remote shells wrote since it started, once no process of their group is left:
        a shell that died with its connection never removed its own)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(psutil.Error):
                for session in psutil.Process(self.process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        session.kill()
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pgid_file in Path("/tmp").glob(REMOTE_PGID_GLOB):
            with contextlib.suppress(OSError, ValueError):
                if pgid_file.stat().st_mtime >= self.started_at:
                    try:
                        os.killpg(int(pgid_file.read_text().split()[0]), 0)
                    except ProcessLookupError:
                        pgid_file.unlink()  # nothing of its group is left
        for left in Path("/tmp").glob(REMOTE_LEFT_GLOB):
            with contextlib.suppress(OSError):
                if left.stat().st_mtime >= self.started_at:
                    shutil.rmtree(left, ignore_errors=True)

    def __enter__(self) -> LoopbackSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
