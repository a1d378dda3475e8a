"""The wire of the loopback Kubernetes API emulation: `KubeApiServer`, the HTTP(S) server tests
start, and the handler that speaks the REST/JSON wire format over the state in
tests/support/kube_store.py (routing, JSON bodies, `kind: Status` errors, chunked watches,
discovery, pod logs, the service proxy, authentication, faults), so the official `kubernetes`
client and a real `kubectl` run unmodified. The kubelet and the operators are played over that
state by `KubeController` (tests/support/kube_controller.py), which a test starts beside it.
What follows is the whole emulation a test talks to, the store's and the controller's parts
included.

Emulated: discovery (`/version`, `/api`, `/apis`, APIResourceLists with subresources, short
names and the `all` category), `/openapi/v3` for the kinds it holds with server-side field
validation (`fieldValidation=Strict` refuses unknown fields, `Warn` names them in `Warning`
headers: tests/support/kube_openapi.py), so a real `kubectl` works against it; create,
get, list (per namespace and across them, label and field selectors), replace, patch (merge and
strategic merge both as JSON merge patch, JSON patch), delete (finalizers, ownerReferences
cascade with propagationPolicy, batch/v1 Jobs orphaning by default), deletecollection,
`/status` and `namespaces/finalize`, watches (`resourceVersion`, `timeoutSeconds`), Events. 409
on stale `resourceVersion`, 404 in a missing namespace, 403 in a terminating one.
- Namespace termination that takes time: a deleted namespace stays Terminating for
  `namespace_deletion_s` (a second by default, set per server), its pods terminating gracefully
  meanwhile (listed with `deletionTimestamp`, not ready, named by `NamespaceContentRemaining`),
  the rest of its content deleted at once; finalizers hold it longer.
- Pod logs as the kubelet reads them: `container` (an init container's too), `tailLines`
  (first), `sinceSeconds`, `timestamps`, `limitBytes` (the head of what is selected, cut
  mid-line), `follow`, and `previous` (the last terminated run of a container, kept per
  container ID: a crash loop's; 400 `previous terminated container "x" in pod "y" not found`
  when there is none).
- The service proxy as the API server resolves it: `[scheme:]name[:port]`, a port number the
  Service must declare (503 `no service port`), endpoints as the endpoints controller makes
  them from the ready pods its selector matches that have the port (503 `no endpoints
  available for service`; 404 `endpoints "x" not found` for a Service without a selector), then
  the backend a test routed the Service to (`route_service`: what listens in those pods; 503
  `error trying to reach service` when nothing does).
- Faults on request (`inject`, tests/support/kube_faults.py): 429 (APF's plain text or a
  TooManyRequests Status, `Retry-After`), 500, 503 and 504 Status bodies, connection resets, for
  a count of requests or until cleared, by method and path.

Authentication and authorization are off by default: every request is allowed. With
`authentication=True` every path (discovery, pod logs and the service proxy included) wants
`Authorization: Bearer <token>` of a token the server issued (`admin_token`, a system:masters
user; `issue_token`; `service_account_token`, refused once its ServiceAccount is gone), or with
`tls=True` a client certificate its CA signed (CN the user, O the groups), and answers 401 with
the body a real server writes otherwise, as with `--anonymous-auth=false`. With `rbac=True`
(which implies it) requests are also authorized by RBAC over the Roles, ClusterRoles,
RoleBindings and ClusterRoleBindings the server holds (plus bootstrap cluster-admin,
system:discovery and system:public-info-viewer), with the escalation checks on writing them,
and refused with the real 403 bodies (tests/support/kube_rbac.py). `tls=True` serves HTTPS with
a certificate of its own CA (trustme), which its kubeconfigs trust: kubectl sends credentials
over TLS only (client-go clientcmd reads a kubeconfig's user only for a TLS server).

Not emulated: anonymous requests, token expiry and JWTs (tokens are opaque strings in a table),
impersonation, the identities of the controller (it writes the store directly, unchecked),
admission and validation beyond unknown fields (bodies are stored as sent, beyond a few
defaults), OpenAPI v2, schemas and defaulting of most fields, server-side apply,
strategic-merge list semantics (lists are replaced), `limit`/`continue` pagination, bookmarks,
dry runs, graceful deletion outside a terminating namespace (objects without finalizers go at
once; garbage collection is synchronous), Endpoints and EndpointSlices as objects (so no
Service without a selector can be proxied), protobuf/CBOR/YAML, port-forward, exec/attach and
every WebSocket, real scheduling, nodes, ReplicaSet rollouts (a new template replaces the old
ReplicaSet at once), Ray worker pods and Spark executors, throttling of its own (a 429 comes
only from `inject`), log rotation (a container's whole log is kept).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json
import random
import secrets
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trustme

from tests.support import kube_openapi
from tests.support.kube_faults import Fault, FaultPlan
from tests.support.kube_rbac import (
    AUTHENTICATED,
    BOOTSTRAP_POLICY,
    MASTERS,
    RBAC_GROUP,
    Attributes,
    Policy,
    User,
    escalation_denial,
    forbidden,
    request_attributes,
)
from tests.support.kube_store import (
    NAMESPACE_DELETION_S,
    RESOURCE_TYPES,
    TYPES,
    Admit,
    ApiError,
    Obj,
    ObjectStore,
    ResourceType,
    bad_request,
    compile_field_selector,
    compile_label_selector,
    details,
    pod_ready,
    rfc3339_nano,
    unauthorized,
)

# --- the wire format -----------------------------------------------------------------------

SUBRESOURCE_SHAPES = {  # subresource: (kind, verbs) in discovery; None = the parent's kind
    "status": (None, ["get", "patch", "update"]), "finalize": (None, ["update"]),
    "log": (None, ["get"]), "proxy": ("ServiceProxyOptions",
                                      ["create", "delete", "get", "patch", "update"]),
}
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0+mlci-emulator", "gitCommit": "",
           "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
           "compiler": "gc", "platform": "linux/amd64"}


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: KubeApiServer) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        super().__init__(address, _ApiHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.api.tls is None:
            return sock, address
        # the handshake happens on the handler's thread, at its first read
        return self.api.tls.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), address


class _ApiHandler(BaseHTTPRequestHandler):
    """Routes one request onto the store and writes the answer as the API server would."""

    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle meets delayed ACKs
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError, ValueError):  # ValueError: a connection reset here
            super().finish()

    def log_message(self, *args: Any) -> None:  # tests read api.requests instead
        pass

    def _dispatch(self) -> None:
        raw_path, _, self.query = self.path.partition("?")
        self.warnings: list[str] = []
        self.params = {k: v[-1] for k, v in parse_qs(self.query, keep_blank_values=True).items()}
        self.api, self.store = self.server.api, self.server.api.store
        self.api._requests.append((self.command, unquote(raw_path)))
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        full = [unquote(segment) for segment in raw_path.split("/")[1:]]
        segments = list(full)
        while segments and not segments[-1]:
            segments.pop()
        try:
            # As the real filter chain: authentication, then flow control (the faults a test
            # injected: throttling and errors), then authorization, then the handler.
            self.user = self.api.authenticate(self.headers.get("Authorization"),
                                              self._peer_certificate())
            self.api._request_log.append((self.user.name if self.user else "", self.command,
                                          unquote(raw_path)))
            fault = self.api.faults.take(self.command, unquote(raw_path))
            if fault is not None:
                return self._answer_fault(fault)
            self.attrs = request_attributes(self.command, unquote(raw_path), self.params)
            self.api.authorize(self.user, self.attrs)
            self._route(segments, full)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away (a killed run): nobody to answer
        except ApiError as error:
            self._send_json(error.code, error.status())
        except ValueError as error:  # a body or a parameter that does not parse
            self._send_json(400, bad_request(f"{type(error).__name__}: {error}").status())
        except Exception as error:  # a bug here answers as the server's would
            self._send_json(500, ApiError(500, "InternalError", f"{error!r}").status())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _answer_fault(self, fault: Fault) -> None:
        if fault.reset:  # RST instead of an answer: SO_LINGER with a zero timeout
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        code, headers, body = fault.response()
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, segments: list[str], full: list[str]) -> None:
        if segments[:2] == ["openapi", "v3"] and self.command == "GET":
            return self._openapi("/".join(segments[2:]))
        if segments in (["version"], ["api"], ["apis"]) or segments[:1] == ["apis"] and len(
                segments) == 2:
            return self._discovery(segments)
        if segments[:1] == ["api"] and len(segments) >= 2:
            group, version, rest, offset = "", segments[1], segments[2:], 2
        elif segments[:1] == ["apis"] and len(segments) >= 3:
            group, version, rest, offset = segments[1], segments[2], segments[3:], 3
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        types = {t.plural: t for t in RESOURCE_TYPES if (t.group, t.version) == (group, version)}
        if not types:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return self._send_json(200, _resource_list(group, version, types.values()))
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] in types and types[
                rest[2]].namespaced:
            namespace, rest, offset = rest[1], rest[2:], offset + 2
        rtype = types.get(rest[0])
        if rtype is None or (namespace is None and rtype.namespaced and len(rest) > 1):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name, sub = (rest + [None, None])[1:3]
        if sub == "proxy" and rtype.kind == "Service":
            return self._proxy(namespace or "", name, "/".join(full[offset + 3:]))
        if len(rest) > 3 or (sub and sub not in rtype.subresources):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        handler = {
            (False, None, "GET"): self._list, (False, None, "POST"): self._create,
            (False, None, "DELETE"): self._delete_collection, (True, None, "GET"): self._get,
            (True, None, "PUT"): self._replace, (True, None, "PATCH"): self._patch,
            (True, None, "DELETE"): self._delete, (True, "status", "GET"): self._get,
            (True, "status", "PUT"): self._replace, (True, "status", "PATCH"): self._patch,
            (True, "finalize", "PUT"): self._replace, (True, "log", "GET"): self._log,
        }.get((name is not None, sub, self.command))
        if handler is None or (self.command == "POST" and rtype.namespaced and namespace is None):
            raise ApiError(405, "MethodNotAllowed",
                           "the server does not allow this method on the requested resource")
        handler(rtype, namespace, name, sub or "main")

    def _discovery(self, segments: list[str]) -> None:
        groups = {}
        for t in RESOURCE_TYPES:
            if t.group:
                gv = {"groupVersion": t.api_version, "version": t.version}
                groups[t.group] = {"name": t.group, "versions": [gv], "preferredVersion": gv}
        if segments == ["version"]:
            body: Obj = self.api.version
        elif segments == ["api"]:
            body = {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": self.api.url.split("//")[1]}]}
        elif segments == ["apis"]:
            body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": list(groups.values())}
        elif segments[1] in groups:
            body = {"kind": "APIGroup", "apiVersion": "v1", **groups[segments[1]]}
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._send_json(200, body)

    def _openapi(self, path: str) -> None:
        """`/openapi/v3` and `/openapi/v3/<group version path>` (tests/support/kube_openapi.py)."""
        body = kube_openapi.root(RESOURCE_TYPES) if not path else kube_openapi.document(
            RESOURCE_TYPES, path)
        if body is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._send_json(200, body)

    def _json_body(self) -> Any:
        return json.loads(self.body or b"{}")

    def _check_fields(self, rtype: ResourceType, body: Any) -> None:
        """Server-side field validation of a create, update or (merge) patch body, as its
        `fieldValidation` parameter asks: Strict refuses unknown fields with 400, Warn names
        them in `Warning` headers. Not asked, nothing is checked (a real server warns, which
        the official Python client does not read)."""
        mode = self.params.get("fieldValidation", "Ignore")
        if mode not in ("Strict", "Warn", "Ignore"):
            raise bad_request(f"fieldValidation parameter unsupported: {mode}")
        if mode == "Ignore" or not isinstance(body, dict):
            return
        unknown = kube_openapi.unknown_fields(
            {**_without_directives(body), "apiVersion": rtype.api_version, "kind": rtype.kind})
        if not unknown:
            return
        if mode == "Warn":
            self.warnings = [f'unknown field "{field}"' for field in unknown]
            return
        raise bad_request(
            f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: '
            "strict decoding error: " + ", ".join(f'unknown field "{f}"' for f in unknown))

    def _selectors(self) -> Callable[[Obj], bool]:
        labels = compile_label_selector(self.params.get("labelSelector", ""))
        fields = compile_field_selector(self.params.get("fieldSelector", ""))
        return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)

    def _list(self, rtype: ResourceType, namespace: str | None, *_: Any) -> None:
        matches = self._selectors()
        if self.params.get("watch", "").lower() in ("true", "1"):
            events = self.store.watch(rtype, namespace, matches,
                                      self.params.get("resourceVersion", ""),
                                      float(self.params.get("timeoutSeconds") or 1800))
            return self._stream((None if e is None else json.dumps(
                {"type": e[0], "object": e[1]}).encode() + b"\n" for e in events),
                "application/json")
        items, rv = self.store.list(rtype, namespace, matches)
        if not rtype.custom:  # the server omits them on the items of built-in lists
            items = [{k: v for k, v in i.items() if k not in ("kind", "apiVersion")} for i in items]
        self._send_json(200, {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                              "metadata": {"resourceVersion": rv}, "items": items})

    def _admit(self, rtype: ResourceType) -> Admit | None:
        """With RBAC, a write of a Role, ClusterRole or binding grants only what its author
        holds (or may escalate or bind)."""
        if not self.api.rbac or rtype.group != RBAC_GROUP or self.user is None:
            return None
        user, attrs, api = self.user, self.attrs, self.api

        def admit(current: Obj | None, new: Obj) -> None:
            denial = escalation_denial(api.policy(), user, attrs, current, new)
            if denial is not None:
                raise ApiError(denial.code, denial.reason, denial.message, denial.details,
                               bare=denial.code == 400)
        return admit

    def _create(self, rtype: ResourceType, namespace: str | None, *_: Any) -> None:
        body = self._json_body()
        self._check_fields(rtype, body)
        self._send_json(201, self.store.create(rtype, namespace, body, self._admit(rtype)))

    def _get(self, rtype: ResourceType, namespace: str | None, name: str, *_: Any) -> None:
        self._send_json(200, self.store.get(rtype, namespace, name))

    def _replace(self, rtype: ResourceType, namespace: str | None, name: str, part: str) -> None:
        body = self._json_body()
        self._check_fields(rtype, body)
        self._send_json(200, self.store.update(rtype, namespace, name, body, part,
                                               admit=self._admit(rtype)))

    def _patch(self, rtype: ResourceType, namespace: str | None, name: str, part: str) -> None:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        body = self._json_body()
        self._check_fields(rtype, body)  # a JSON patch (a list of operations) is not checked
        self._send_json(200, self.store.patch(rtype, namespace, name, body, content_type, part,
                                              self._admit(rtype)))

    def _propagation(self) -> str | None:
        options = self._json_body() if self.body else {}
        policy = self.params.get("propagationPolicy") or options.get("propagationPolicy")
        orphan = str(self.params.get("orphanDependents", options.get("orphanDependents", "")))
        return policy or ("Orphan" if orphan.lower() == "true" else None)

    def _delete(self, rtype: ResourceType, namespace: str | None, name: str, *_: Any) -> None:
        obj, gone = self.store.delete(rtype, namespace, name, self._propagation())
        self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Success", "details": {**details(rtype, name),
                              "uid": obj["metadata"]["uid"]}} if gone else obj)

    def _delete_collection(self, rtype: ResourceType, namespace: str | None, *_: Any) -> None:
        items, _rv = self.store.list(rtype, namespace, self._selectors())
        policy = self._propagation()
        for obj in items:
            with contextlib.suppress(ApiError):
                self.store.delete(rtype, obj["metadata"].get("namespace"),
                                  obj["metadata"]["name"], policy)
        self._send_json(200, {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                              "metadata": {"resourceVersion": self.store.resource_version},
                              "items": items})

    def _log(self, rtype: ResourceType, namespace: str | None, name: str, *_: Any) -> None:
        """A container's log; init containers (native sidecars among them) are containers of
        the pod too (pkg/registry/core/pod/strategy.go LogLocation, podHasContainerWithName;
        the kubelet finds their status in initContainerStatuses)."""
        pod = self.store.get(rtype, namespace, name)
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        inits = [c["name"] for c in pod["spec"].get("initContainers") or []]
        container = self.params.get("container") or (containers[0] if len(containers) == 1 else "")
        if not container:
            raise bad_request(f"a container name must be specified for pod {name}, choose one "
                              f"of: [{' '.join(containers)}]" + (
                                  f" or one of the init containers: [{' '.join(inits)}]"
                                  if inits else ""))
        if container not in containers + inits:
            raise bad_request(f"container {container} is not valid for pod {name}")
        status = next((s for s in [*pod["status"].get("containerStatuses", []),
                                   *pod["status"].get("initContainerStatuses", [])]
                       if s["name"] == container), None)
        previous = self.params.get("previous", "").lower() in ("true", "1")
        if status is None and not previous:  # not scheduled yet: nothing to read, no error
            return self._send(200, b"", "text/plain")
        run = container_run(name, container, status or {}, previous)
        follow = self.params.get("follow", "").lower() in ("true", "1") and not previous
        everything = self.store.log_lines(namespace or "", name, container, run)
        # As the kubelet reads a log (pkg/kubelet/kuberuntime/logs/logs.go ReadLogs): the last
        # tailLines lines, those of them not older than sinceSeconds, each with its timestamp
        # if asked, cut once limitBytes bytes are written: the head of that range.
        lines = everything
        if self.params.get("tailLines"):
            lines = lines[len(lines) - min(len(lines), int(self.params["tailLines"])):]
        if self.params.get("sinceSeconds"):
            since = time.time_ns() - int(self.params["sinceSeconds"]) * 1_000_000_000
            lines = [line for line in lines if line[0] >= since]
        stamped = self.params.get("timestamps", "").lower() in ("true", "1")
        limit = int(self.params["limitBytes"]) if self.params.get("limitBytes") else None
        if limit is not None and limit < 1:
            raise ApiError(422, "Invalid", f'PodLogOptions "{name}" is invalid: limitBytes: '
                           f"Invalid value: {limit}: must be greater than 0",
                           {"name": name, "kind": "PodLogOptions"})

        def render(ts: int, line: str) -> bytes:
            return f"{rfc3339_nano(ts) + ' ' if stamped else ''}{line}\n".encode()

        if not follow:
            return self._send(200, b"".join(render(*line) for line in lines)[:limit],
                              "text/plain")
        tail = (render(*line) for line in lines)
        more = (None if line is None else render(*line) for line in self.store.follow_log(
            namespace or "", name, container, len(everything)))
        self._stream(_limited(itertools.chain(tail, more), limit), "text/plain")

    def _proxy(self, namespace: str, service_id: str, path: str) -> None:
        """As the API server resolves `[scheme:]name[:port]` (pkg/registry/core/service/
        storage/storage.go ResourceLocation): a port number must be one the Service declares
        (503), its endpoints must exist (404: a Service without a selector has none here) and
        hold a ready address for that port (503); then the backend a test routed the Service to
        answers, as the process listening in that pod would (503 when nothing listens)."""
        _, service, port = split_scheme_name_port(service_id)
        port_name = port
        if port.isdigit():
            declared = self.store.get(TYPES["Service"], namespace, service)
            match = next((p for p in (declared.get("spec") or {}).get("ports") or []
                          if str(p.get("port")) == port), None)
            if match is None:
                raise ApiError(503, "ServiceUnavailable", f'no service port {port} found for '
                               f'service "{service}"', bare=True)
            port_name = match.get("name", "")
        try:
            found = self.store.get(TYPES["Service"], namespace, service)
        except ApiError:
            found = None
        selector = ((found or {}).get("spec") or {}).get("selector")
        if not selector:
            raise ApiError(404, "NotFound", f'endpoints "{service}" not found',
                           {"name": service, "kind": "endpoints"})
        assert found is not None
        pods = self.store.list(TYPES["Pod"], namespace, lambda p: all(
            (p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()))[0]
        subsets = endpoint_addresses(found, pods)
        if not subsets:
            raise ApiError(503, "ServiceUnavailable",
                           f'no endpoints available for service "{service}"', bare=True)
        ready = subsets.get(port_name, ([], []))[0]
        if not ready:
            raise ApiError(503, "ServiceUnavailable",
                           f'no endpoints available for service "{service_id}"', bare=True)
        address = random.choice(ready)
        backend = self.api.backend_for(namespace, service)
        if backend is None:
            raise ApiError(503, "ServiceUnavailable", f"error trying to reach service: dial tcp "
                           f"{address}: connect: connection refused", bare=True)
        target = urlsplit(backend)
        connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port,
                                                timeout=30)
        headers = {k: v for k in ("Content-Type", "Accept") if (v := self.headers.get(k))}
        try:
            connection.request(self.command, f"{target.path.rstrip('/')}/{path}" + (
                f"?{self.query}" if self.query else ""), body=self.body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as error:
            raise ApiError(503, "ServiceUnavailable", f"error trying to reach service: dial tcp "
                           f"{address} (routed to {target.netloc}): {error}",
                           bare=True) from error
        finally:
            connection.close()
        self._send(response.status, data, response.getheader("Content-Type") or "text/plain")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        for warning in self.warnings:  # RFC 7234's form, as k8s.io/apiserver pkg/warning writes
            self.send_header("Warning", '299 - "' + warning.replace('"', '\\"') + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, code: int, body: Any) -> None:
        self._send(code, json.dumps(body).encode(), "application/json")

    def _stream(self, chunks: Iterator[bytes | None], content_type: str) -> None:
        """Chunked transfer of chunks; None means idle: a chance to notice a client gone."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(OSError):
            for chunk in chunks:
                if chunk is None:
                    if self._client_gone():
                        return
                elif chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")

    def _peer_certificate(self) -> Obj | None:
        getpeercert = getattr(self.connection, "getpeercert", None)
        return getpeercert() if getpeercert is not None else None

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if readable and isinstance(self.connection, ssl.SSLSocket):
            return True  # a client mid-stream sends nothing but its close_notify or a FIN
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _without_directives(patch: Any) -> Any:
    """A strategic merge patch without its directives (`$patch`, `$setElementOrder/<list>`,
    `$retainKeys`, `$deleteFromPrimitiveList/<list>`): the fields it sets."""
    if isinstance(patch, dict):
        return {k: _without_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [_without_directives(item) for item in patch]
    return patch


def split_scheme_name_port(service_id: str) -> tuple[str, str, str]:
    """`name`, `name:port` or `scheme:name:port`, as apimachinery's util/net SplitSchemeNamePort
    reads a proxied Service's id (`http:web` is the Service `http`, port `web`)."""
    parts = service_id.split(":")
    scheme, name, port = ("", parts[0], "") if len(parts) == 1 else (
        "", parts[0], parts[1]) if len(parts) == 2 else (*parts,) if len(parts) == 3 else (
        "", "", "")
    if not name or scheme not in ("", "http", "https"):
        raise bad_request(f'invalid service request "{service_id}"')
    return scheme, name, port


def endpoint_addresses(service: Obj, pods: list[Obj]) -> dict[str, tuple[list[str], list[str]]]:
    """What the endpoints controller makes of a Service's pods (pkg/controller/endpoint
    endpoints_controller.go syncService): per port name, the ready and the not-ready
    `ip:port` of each pod its selector matched that may be an endpoint (an IP, not terminating
    nor ended: endpointslice ShouldPodBeInEndpoints) and has the port (a named targetPort is
    a container port's name: FindPort). Empty: the Endpoints have no subsets."""
    spec = service.get("spec") or {}
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    found: dict[str, tuple[list[str], list[str]]] = {}
    for pod in pods:
        status, restart = pod.get("status") or {}, pod["spec"].get("restartPolicy", "Always")
        ended = {"Never": ("Failed", "Succeeded"), "OnFailure": ("Succeeded",)}.get(restart, ())
        if not status.get("podIP") or status.get("phase") in ended or (
                pod["metadata"].get("deletionTimestamp") and not publish_not_ready):
            continue
        ready = publish_not_ready or pod_ready(pod)
        named = {p.get("name"): p.get("containerPort") for c in pod["spec"].get(
            "containers") or [] for p in c.get("ports") or [] if p.get("name")}
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            number = named.get(target) if isinstance(target, str) else target
            if number is None:
                continue
            addresses = found.setdefault(port.get("name", ""), ([], []))
            addresses[0 if ready else 1].append(f"{status['podIP']}:{number}")
    return found


def container_run(pod: str, container: str, status: Obj, previous: bool) -> str:
    """The container ID of the run whose log is read, or the 400 the kubelet answers
    (pkg/kubelet/kubelet_pods.go validateContainerLogStatus): the previous run is the last
    terminated one; otherwise the running one, else the one that ended."""
    state, last = status.get("state") or {}, (status.get("lastState") or {}).get("terminated")
    if previous:
        if not (last or {}).get("containerID"):
            raise bad_request(f'previous terminated container "{container}" in pod "{pod}" not '
                              "found")
        return last["containerID"]
    if "running" in state:
        return status.get("containerID", "")
    if "terminated" in state or last:
        run = (state.get("terminated") or {}).get("containerID") or (last or {}).get(
            "containerID")
        if not run:
            raise bad_request(f'container "{container}" in pod "{pod}" is terminated')
        return run
    waiting = state.get("waiting")
    if waiting:
        why = {"ErrImagePull": "image can't be pulled",
               "ImagePullBackOff": "trying and failing to pull image"}
        raise bad_request(f'container "{container}" in pod "{pod}" is waiting to start: '
                          f"{why.get(waiting.get('reason'), waiting.get('reason'))}")
    raise bad_request(f'container "{container}" in pod "{pod}" is waiting to start - no logs '
                      "yet")


def _limited(chunks: Iterator[bytes | None], limit: int | None) -> Iterator[bytes | None]:
    """chunks until limit bytes have gone (a log followed with limitBytes ends there)."""
    for chunk in chunks:
        if chunk is None or limit is None:
            yield chunk
            continue
        yield chunk[:limit]
        limit -= len(chunk)
        if limit <= 0:
            return


def _resource_list(group: str, version: str, types: Any) -> Obj:
    resources = []
    for t in types:
        verbs = ["create", "delete", *(["deletecollection"] if t.namespaced else []), "get",
                 "list", "patch", "update", "watch"]
        resources.append({"name": t.plural, "singularName": t.kind.lower(),
                          "namespaced": t.namespaced, "kind": t.kind, "verbs": verbs,
                          **({"shortNames": list(t.short_names)} if t.short_names else {}),
                          **({"categories": list(t.categories)} if t.categories else {})})
        for sub in t.subresources:
            kind, sub_verbs = SUBRESOURCE_SHAPES[sub]
            resources.append({"name": f"{t.plural}/{sub}", "singularName": "",
                              "namespaced": t.namespaced, "kind": kind or t.kind,
                              "verbs": sub_verbs})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        body = json.dumps({"path": self.path, "ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def echo_backend() -> Iterator[str]:
    """What listens in a Service's pods, for `KubeApiServer.route_service`: an HTTP server on
    loopback answering every GET with `{"path": <the path it was asked>, "ok": true}`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class KubeApiServer:
    """The emulated API server on http://127.0.0.1:<port> (port 0: a free one), started by
    start() or a with block. Tests reach its state directly: objects(), namespaces(), requests,
    register what listens behind a Service's pods with route_service(), and make it fail
    requests with inject().

    authentication: every request must carry a bearer token this server issued (401 if not).
    rbac: and be allowed by the RBAC objects it holds (403 if not); implies authentication.
    namespace_deletion_s: how long a deleted namespace stays Terminating (its pods terminating
    gracefully meanwhile); `store.namespace_deletion_s` changes it on a running server.
    `version`: what `/version` answers (VERSION), which a test may change (an older cluster)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1",
                 namespaces: tuple[str, ...] = DEFAULT_NAMESPACES, *,
                 authentication: bool = False, rbac: bool = False, tls: bool = False,
                 namespace_deletion_s: float = NAMESPACE_DELETION_S) -> None:
        self.store = ObjectStore(namespace_deletion_s=namespace_deletion_s)
        self.faults = FaultPlan()
        self.version: Obj = dict(VERSION)
        for name in namespaces:
            self.store.create(TYPES["Namespace"], None, {"metadata": {"name": name}})
        self.authentication, self.rbac = authentication or rbac, rbac
        if rbac:
            for obj in BOOTSTRAP_POLICY:
                self.store.create(TYPES[obj["kind"]], None, obj)
        self._tokens: dict[str, User] = {}
        self.admin_token = self.issue_token("kubernetes-admin", [MASTERS])
        self.ca: trustme.CA | None = None
        self.tls: ssl.SSLContext | None = None
        if tls:
            self.ca = trustme.CA(organization_name="mlci kube emulator")
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert(host, "localhost").configure_cert(self.tls)
            self.ca.configure_trust(self.tls)  # client certificates this CA signed
            self.tls.verify_mode = ssl.CERT_OPTIONAL
        self._address = (host, port)
        self._routes: dict[tuple[str | None, str], str] = {}
        self._requests: list[tuple[str, str]] = []
        self._request_log: list[tuple[str, str, str]] = []
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("KubeApiServer.url: the server is not started")
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self) -> KubeApiServer:
        self._httpd = _HttpServer(self._address, self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends watches and log streams, closes every client connection and the socket."""
        self.store.close()
        if self._httpd is None:
            return
        self._httpd.shutdown()
        for connection in list(self._httpd.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: str | Path, namespace: str = "default", *,
                   token: str | None = None, exec_command: list[str] | None = None,
                   client_certificate: tuple[str, list[str] | tuple[str, ...]] | None = None
                   ) -> Path:
        """Writes a kubeconfig (JSON is YAML) whose current context is this server (with TLS,
        trusting its CA). Its user has `token`, or an exec credential plugin (`exec_command`,
        see write_exec_plugin), or a client certificate this server's CA signs for
        `client_certificate` (user, groups), or else the admin token when authentication is
        on, or no credentials at all."""
        name = "mlci-emulator"
        if token is None and exec_command is None and client_certificate is None and \
                self.authentication:
            token = self.admin_token
        user: Obj = {"token": token} if token is not None else {}
        if exec_command is not None:
            user = {"exec": {"apiVersion": EXEC_CREDENTIAL_VERSION, "command": exec_command[0],
                             "args": exec_command[1:], "interactiveMode": "Never"}}
        cluster: Obj = {"server": self.url}
        if self.ca is not None:
            cluster["certificate-authority-data"] = _base64(self.ca.cert_pem.bytes())
        if client_certificate is not None:
            if self.ca is None:
                raise ValueError("kubeconfig(client_certificate=...): the server has no TLS")
            cert = self.ca.issue_cert(f"{client_certificate[0]}@users.mlci.test",  # any SAN
                                      common_name=client_certificate[0],
                                      organization_name=",".join(client_certificate[1]) or None)
            user = {"client-certificate-data": _base64(cert.cert_chain_pems[0].bytes()),
                    "client-key-data": _base64(cert.private_key_pem.bytes())}
        config = {"apiVersion": "v1", "kind": "Config", "current-context": name,
                  "clusters": [{"name": name, "cluster": cluster}],
                  "users": [{"name": name, "user": user}],
                  "contexts": [{"name": name, "context": {"cluster": name, "user": name,
                                                          "namespace": namespace}}]}
        Path(path).write_text(json.dumps(config, indent=2))
        return Path(path)

    def route_service(self, namespace: str | None, service: str, backend_url: str) -> None:
        """What listens in this Service's pods (None: in any namespace): once a ready pod backs
        the port asked for, the service proxy forwards to backend_url. A `{namespace}` in it
        becomes the namespace asked for, so one backend can answer as each sandbox's own."""
        self._routes[(namespace, service)] = backend_url

    def backend_for(self, namespace: str, service: str) -> str | None:
        backend = self._routes.get((namespace, service)) or self._routes.get((None, service))
        return backend.replace("{namespace}", namespace) if backend else None

    # --- faults on request
    def inject(self, status: int | None = None, *, count: int | None = 1,
               retry_after: int | None = None, methods: tuple[str, ...] | None = None,
               path_regex: str | None = None, plain: bool = False, message: str | None = None,
               reset: bool = False) -> Fault:
        """Answers the next `count` matching requests (None: all of them until clear_faults)
        with `status` as a real server does (429 TooManyRequests, `plain` for the text body
        API Priority and Fairness sends; 500, 503, 504), or drops their connection (`reset`).
        Requests match by method (`methods`, None: any) and by a regular expression searched
        in the percent-decoded path (`path_regex`). Faults come after authentication, before
        authorization, as flow control does; the first added that matches answers. The
        returned Fault counts what it answered. See tests/support/kube_faults.py."""
        return self.faults.add(Fault(
            status, count, retry_after, frozenset(methods) if methods is not None else None,
            path_regex, plain, message, reset))

    def clear_faults(self) -> None:
        self.faults.clear()

    # --- who may do what
    def issue_token(self, user: str, groups: list[str] | tuple[str, ...] = ()) -> str:
        """A new bearer token for user in groups (system:authenticated added, as every
        authenticated user gets it)."""
        token = secrets.token_urlsafe(32)
        self._tokens[token] = User(user, (*groups, *(
            [] if AUTHENTICATED in groups else [AUTHENTICATED])))
        return token

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token of the ServiceAccount (valid while the ServiceAccount exists)."""
        token = secrets.token_urlsafe(32)
        self._tokens[token] = User.service_account(namespace, name)
        return token

    def revoke_token(self, token: str) -> None:
        self._tokens.pop(token, None)

    def authenticate(self, authorization: str | None, certificate: Obj | None = None
                     ) -> User | None:
        """The user a verified client certificate (its CN the user, each O a group, as the
        x509 authenticator reads them) or an Authorization header names (None while
        authentication is off); raises the 401 otherwise. `Bearer` in any case, as the server
        reads it."""
        if not self.authentication:
            return None
        if certificate:
            subject = [pair for rdn in certificate.get("subject", ()) for pair in rdn]
            name = next((v for k, v in subject if k == "commonName"), "")
            groups = [g for k, v in subject if k == "organizationName" for g in v.split(",")]
            if name:
                return User(name, (*groups, AUTHENTICATED))
        parts = (authorization or "").strip().split(" ", 2)
        user = self._tokens.get(parts[1]) if len(parts) >= 2 and parts[0].lower() == \
            "bearer" else None
        if user is None:
            raise unauthorized()
        account = user.service_account_ref()
        if account is not None:
            try:
                self.store.get(TYPES["ServiceAccount"], account[0], account[1])
            except ApiError:
                raise unauthorized() from None
        return user

    def policy(self) -> Policy:
        """The RBAC objects held now."""
        return Policy.from_objects(o for kind in ("Role", "ClusterRole", "RoleBinding",
                                                  "ClusterRoleBinding")
                                   for o in self.store.list(TYPES[kind])[0])

    def authorize(self, user: User | None, attrs: Attributes) -> None:
        """Raises the 403 a real server answers when RBAC does not allow the request."""
        if not self.rbac or user is None or self.policy().allows(user, attrs):
            return
        denial = forbidden(user, attrs)
        raise ApiError(denial.code, denial.reason, denial.message, denial.details)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, percent-decoded path without the query) of every request so far."""
        return list(self._requests)

    @property
    def request_log(self) -> list[tuple[str, str, str]]:
        """(user, method, path) of every request that passed authentication ("" as the user
        while authentication is off)."""
        return list(self._request_log)

    def objects(self, kind: str | None = None, namespace: str | None = None) -> list[Obj]:
        return [o for o in self.store.all_objects() if kind in (None, o["kind"])
                and namespace in (None, o["metadata"].get("namespace"))]

    def namespaces(self) -> list[str]:
        return [ns["metadata"]["name"] for ns in self.objects("Namespace")]


EXEC_CREDENTIAL_VERSION = "client.authentication.k8s.io/v1"
_EXEC_PLUGIN = """#!{python}
# An exec credential plugin (as aws eks get-token or gke-gcloud-auth-plugin are): prints the
# token in {token_file} as an ExecCredential expiring in {lifetime_s}s, and counts its calls.
import json, sys
from datetime import datetime, timedelta, timezone
with open({calls!r}, "a") as calls:
    calls.write("1\\n")
expires = datetime.now(timezone.utc) + timedelta(seconds={lifetime_s})
json.dump({{"apiVersion": {version!r}, "kind": "ExecCredential", "status": {{
    "token": open({token_file!r}).read().strip(),
    "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}}}, sys.stdout)
"""


def write_exec_plugin(path: str | Path, token_file: str | Path, lifetime_s: float = 60
                      ) -> list[str]:
    """Writes an exec credential plugin that hands out whatever token token_file holds then,
    and returns its command for KubeApiServer.kubeconfig(exec_command=...). Each run appends a
    line to `<path>.calls`. The official client runs a plugin again whenever its last token
    expires within 5 minutes: with the default lifetime, before each request."""
    script = Path(path)
    script.write_text(_EXEC_PLUGIN.format(
        python=sys.executable, token_file=str(token_file), lifetime_s=lifetime_s,
        calls=f"{script}.calls", version=EXEC_CREDENTIAL_VERSION))
    script.chmod(0o755)
    return [str(script)]


