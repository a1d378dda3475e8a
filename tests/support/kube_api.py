"""A loopback emulation of the Kubernetes API server for tests, and a controller that plays the
kubelet and the operators over its state, so the official `kubernetes` client runs unmodified.

`ObjectStore` is the state (objects, change history, container logs); `KubeApiServer` is the
wire format on top of it (HTTP routing, JSON bodies, `kind: Status` errors, chunked watches);
`KubeController` advances the store as kubelet, scheduler and controllers would: healthy by
default, failing for the objects `KubeController.behave` names (kind, name glob, namespace).

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
- Pod logs as the kubelet reads them: `container`, `tailLines` (first), `sinceSeconds`,
  `timestamps`, `limitBytes` (the head of what is selected, cut mid-line), `follow`, and
  `previous` (the last terminated run of a container, kept per container ID: a crash loop's;
  400 `previous terminated container "x" in pod "y" not found` when there is none).
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
import bisect
import contextlib
import copy
import hashlib
import http.client
import itertools
import json
import math
import random
import re
import secrets
import select
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
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

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ("status",)
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()  # `kubectl get all` lists the kinds in category "all"
    custom: bool = False  # a CustomResourceDefinition: list items keep kind/apiVersion
    orphan_by_default: bool = False  # batch/v1 Jobs orphan their pods unless told otherwise

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:  # as the server names it in messages: pods, deployments.apps
        return f"{self.plural}.{self.group}" if self.group else self.plural


# Adding a resource type is one line here.
# The short names and categories are a real server's (kubernetes pkg/registry/*/storage).
ALL = ("all",)
RESOURCE_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", False, ("status", "finalize"), ("ns",)),
    ResourceType("", "v1", "pods", "Pod", subresources=("status", "log"), short_names=("po",),
                 categories=ALL),
    ResourceType("", "v1", "services", "Service", subresources=("status", "proxy"),
                 short_names=("svc",), categories=ALL),
    ResourceType("", "v1", "configmaps", "ConfigMap", subresources=(), short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret", subresources=()),
    ResourceType("", "v1", "events", "Event", subresources=(), short_names=("ev",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", subresources=(),
                 short_names=("sa",)),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",),
                 categories=ALL),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", short_names=("rs",), categories=ALL),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", short_names=("sts",),
                 categories=ALL),
    ResourceType("batch", "v1", "jobs", "Job", orphan_by_default=True, categories=ALL),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", subresources=()),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding",
                 subresources=()),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole",
                 namespaced=False, subresources=()),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                 namespaced=False, subresources=()),
    # As the operators' CRDs declare them: spark-operator's short name `sparkapp`, no
    # categories.
    ResourceType("ray.io", "v1", "rayjobs", "RayJob", custom=True),
    ResourceType("ray.io", "v1", "rayclusters", "RayCluster", custom=True),
    ResourceType("sparkoperator.k8s.io", "v1beta2", "sparkapplications", "SparkApplication",
                 short_names=("sparkapp",), custom=True),
)
TYPES = {t.kind: t for t in RESOURCE_TYPES}
SUBRESOURCE_SHAPES = {  # subresource: (kind, verbs) in discovery; None = the parent's kind
    "status": (None, ["get", "patch", "update"]), "finalize": (None, ["update"]),
    "log": (None, ["get"]), "proxy": ("ServiceProxyOptions",
                                      ["create", "delete", "get", "patch", "update"]),
}
SPECLESS_KINDS = ("ConfigMap", "Secret", "Event", "ServiceAccount", "Role", "RoleBinding",
                  "ClusterRole", "ClusterRoleBinding")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0+mlci-emulator", "gitCommit": "",
           "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
           "compiler": "gc", "platform": "linux/amd64"}
# How long a namespace stays Terminating after its deletion, by default: a real one takes tens of
# seconds (its pods get their termination grace period, the namespace controller sweeps every
# API group), which would add minutes to the suite; a second still shows every teardown a
# namespace that outlives its DELETE, over several of the provider's polls.
NAMESPACE_DELETION_S = 1.0
PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json",
               "application/json-patch+json")
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def now_rfc3339(later_s: float = 0) -> str:
    return datetime.fromtimestamp(time.time() + later_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def random_suffix(length: int = 5) -> str:
    return "".join(random.choices(_SUFFIX_ALPHABET, k=length))


def wait_until(predicate: Callable[[], Any], timeout_s: float = 5, what: str = "condition") -> Any:
    """Polls predicate until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)
    return value


class ManualClock:
    """Time a test moves itself: monotonic() reads it, sleep() and advance() move it on (and
    run each on_sleep callback, a controller's tick say), so a wait of minutes takes none."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []
        self.on_sleep: list[Callable[[], Any]] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        for callback in self.on_sleep:
            callback()


class ApiError(Exception):
    """An error the server answers with a `kind: Status` body (`bare`: without `details`, as
    401s and plain 400s come)."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None,
                 bare: bool = False) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details
        self.bare = bare

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason,
                **({} if self.bare else {"details": self.details or {}}), "code": self.code}


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized", bare=True)


def _details(rtype: ResourceType, name: str) -> Obj:
    return {"name": name, **({"group": rtype.group} if rtype.group else {}), "kind": rtype.plural}


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.resource} "{name}" not found', _details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.resource} "{name}": '
                    f"{why}", _details(rtype, name))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message, bare=True)  # NewBadRequest: no details


# --- selectors and patches: pure functions over plain dicts --------------------------------

_REQUIREMENT = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)|(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?"
    r"\s*(?:,|$)")


def compile_label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """`a=b`, `a==b`, `a!=b`, `a in (b,c)`, `a notin (b)`, `a`, `!a`, joined by commas."""
    requirements: list[Callable[[dict[str, str]], bool]] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _REQUIREMENT.match(text, pos)
        if not m or m.end() == pos or (m["neg"] and (m["op"] or m["set"])):
            raise bad_request(f"unable to parse requirement: {text[pos:]!r}")
        key, value = m["key"], m["value"]
        values = {v.strip() for v in (m["values"] or "").split(",")}
        requirements.append(
            (lambda labels, k=key: k not in labels) if m["neg"] else
            (lambda labels, k=key, v=value: labels.get(k) == v) if m["op"] in ("=", "==") else
            (lambda labels, k=key, v=value: labels.get(k) != v) if m["op"] == "!=" else
            (lambda labels, k=key, vs=values: labels.get(k) in vs) if m["set"] == "in" else
            (lambda labels, k=key, vs=values: labels.get(k) not in vs) if m["set"] else
            (lambda labels, k=key: k in labels))
        pos = m.end()
    return lambda labels: all(requirement(labels) for requirement in requirements)


def compile_field_selector(text: str) -> Callable[[Obj], bool]:
    """`metadata.name=x`, `metadata.namespace!=y`, any dotted path, joined by commas."""
    checks = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise bad_request(f"invalid selector: {term!r}; can't understand {term!r}")
        checks.append((m[1].split("."), m[2] == "!=", m[3]))

    def matches(obj: Obj) -> bool:
        for path, negate, value in checks:
            actual = _dig(obj, path)
            if (("" if actual is None else str(actual)) == value) == negate:
                return False
        return True
    return matches


def _dig(obj: Any, path: list[str]) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386; strategic-merge directives (`$patch`, ...) are dropped, lists replaced."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(document: Obj, operations: list[Obj]) -> Obj:
    """RFC 6902 add, remove, replace and test."""
    document = copy.deepcopy(document)
    for op in operations:
        try:
            *parents, last = [p.replace("~1", "/").replace("~0", "~")
                              for p in op["path"].split("/")[1:]]
            node = document
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            index: Any = last
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
            if op["op"] not in ("add", "remove", "replace", "test"):
                raise ValueError(f"unsupported operation {op['op']!r}")
            if op["op"] == "test" and node[index] != op["value"]:
                raise ApiError(422, "Invalid", f"the test of {op['path']} failed")
            if op["op"] in ("remove", "replace"):
                del node[index]
            if op["op"] in ("add", "replace") and isinstance(node, list):
                node.insert(index, op["value"])
            elif op["op"] in ("add", "replace"):
                node[index] = op["value"]
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise ApiError(422, "Invalid", f"json patch {op}: {error!r}") from error
    return document


# --- the state model -----------------------------------------------------------------------

Admit = Callable[[Obj | None, Obj], None]  # (current or None, new): raises ApiError to refuse


class Change(NamedTuple):
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    kind: str
    namespace: str
    obj: Obj


class LogInstance(NamedTuple):
    """One run of a container, as the runtime keeps its log: its container ID and lines."""

    container_id: str
    lines: list[tuple[int, str]]


class ObjectStore:
    """The cluster's state: objects by kind, namespace and name, the history of their changes
    (what watches replay) and container logs (the current and the previous run of each
    container). Thread-safe; reads return copies. `namespace_deletion_s`: how long a deleted
    namespace stays Terminating (the namespace controller reads it)."""

    def __init__(self, history: int = 20_000,
                 namespace_deletion_s: float = NAMESPACE_DELETION_S) -> None:
        self._cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {t.kind: {} for t in RESOURCE_TYPES}
        self._changes: list[Change] = []
        self._history, self._oldest_rv, self._rv = history, 0, 0
        self._logs: dict[tuple[str, str, str], list[LogInstance]] = {}
        self._cluster_ips = itertools.count(10)
        self.namespace_deletion_s = namespace_deletion_s
        self.closed = False

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def _bump(self, obj: Obj) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _record(self, type_: str, obj: Obj) -> None:
        self._changes.append(Change(self._rv, type_, obj["kind"],
                                    obj["metadata"].get("namespace", ""), copy.deepcopy(obj)))
        if len(self._changes) > 2 * self._history:
            del self._changes[:self._history]
            self._oldest_rv = self._changes[0].rv - 1
        self._cond.notify_all()

    def _get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._objects[rtype.kind].get((namespace or "" if rtype.namespaced else "", name))
        if obj is None:
            raise not_found(rtype, name)
        return obj

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        with self._cond:
            return copy.deepcopy(self._get(rtype, namespace, name))

    def list(self, rtype: ResourceType, namespace: str | None = None,
             matches: Callable[[Obj], bool] = lambda obj: True) -> tuple[list[Obj], str]:
        with self._cond:
            objects = sorted(self._objects[rtype.kind].items())
            items = [copy.deepcopy(o) for (ns, _), o in objects if namespace in (None, ns)
                     and matches(o)]
            return items, self.resource_version

    def all_objects(self) -> list[Obj]:
        with self._cond:
            return [copy.deepcopy(o) for objs in self._objects.values() for o in objs.values()]

    def create(self, rtype: ResourceType, namespace: str | None, body: Obj,
               admit: Admit | None = None) -> Obj:
        """admit(None, new) may refuse the object (raising ApiError) once it is complete."""
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        with self._cond:
            if rtype.namespaced:
                if meta.get("namespace", namespace) != namespace:
                    raise bad_request("the namespace of the provided object does not match the "
                                      "namespace sent on the request")
                self._check_namespace_open(rtype, namespace or "", meta)
            name = meta.get("name") or (meta.get("generateName") or "") and (
                meta["generateName"] + random_suffix())
            if not name:
                raise ApiError(422, "Invalid", f'{rtype.kind} "" is invalid: metadata.name: '
                               "Required value: name or generateName is required",
                               {"kind": rtype.kind})
            key = (namespace or "" if rtype.namespaced else "", name)
            if key in self._objects[rtype.kind]:
                raise ApiError(409, "AlreadyExists", f'{rtype.resource} "{name}" already exists',
                               _details(rtype, name))
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "namespace"):
                meta.pop(field, None)
            meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(),
                         **({"namespace": namespace} if rtype.namespaced else {}),
                         **({"generation": 1} if "status" in rtype.subresources else {}))
            obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
            _omit_empty(meta)
            self._apply_defaults(obj)
            if admit is not None:
                admit(None, obj)
            self._bump(obj)
            self._objects[rtype.kind][key] = obj
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def _check_namespace_open(self, rtype: ResourceType, namespace: str, meta: Obj) -> None:
        ns = self._objects["Namespace"].get(("", namespace))
        if ns is None:
            raise not_found(TYPES["Namespace"], namespace)
        if ns["metadata"].get("deletionTimestamp"):
            why = f"unable to create new content in namespace {namespace} because it is being " \
                  "terminated"
            raise ApiError(403, "Forbidden", f'{rtype.resource} "{meta.get("name", "")}" is '
                           f"forbidden: {why}", {**_details(rtype, meta.get("name", "")),
                           "causes": [{"reason": "NamespaceTerminating", "message": why,
                                       "field": "metadata.namespace"}]})

    def _apply_defaults(self, obj: Obj) -> None:
        """The few defaults clients and the controller rely on; status starts over on create."""
        kind = obj["kind"]
        spec = {} if kind in SPECLESS_KINDS else obj.setdefault("spec", {})
        if "status" in TYPES[kind].subresources:  # built-in kinds always show a status
            obj.pop("status", None) if TYPES[kind].custom else obj.update(status={})
        if kind == "Namespace":
            spec["finalizers"] = [*spec.get("finalizers", [])] + (
                [] if "kubernetes" in spec.get("finalizers", []) else ["kubernetes"])
            obj["status"] = {"phase": "Active"}
        elif kind == "Pod":
            spec.setdefault("restartPolicy", "Always")
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif kind == "Service":
            spec.setdefault("type", "ClusterIP")
            if spec.get("clusterIP") != "None":
                spec["clusterIP"] = f"10.96.0.{next(self._cluster_ips)}"
        elif kind in ("Deployment", "StatefulSet", "ReplicaSet"):
            spec.setdefault("replicas", 1)
            obj["status"] = {} if kind == "Deployment" else {"replicas": 0}
        elif kind == "Job":
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completions", 1)

    def update(self, rtype: ResourceType, namespace: str | None, name: str, body: Obj,
               part: str = "main", check_version: bool = True, admit: Admit | None = None
               ) -> Obj:
        """A PUT. part: "main" (status kept), "status" (only status), "finalize" (only
        spec.finalizers) or "all" (a controller writing everything but identity);
        admit(current, new) may refuse the change."""
        meta = body.get("metadata") or {}
        if meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name "
                              f"on the URL ({name})")
        with self._cond:
            current = self._get(rtype, namespace, name)
            if check_version and meta.get("resourceVersion") not in (
                    None, "", current["metadata"]["resourceVersion"]):
                raise conflict(rtype, name, "the object has been modified; please apply your "
                               "changes to the latest version and try again")
            new = copy.deepcopy(current)
            if part == "status":
                new["status"] = copy.deepcopy(body.get("status", {}))
            elif part == "finalize":
                new["spec"]["finalizers"] = list((body.get("spec") or {}).get("finalizers", []))
            else:
                new = copy.deepcopy(body)
                new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
                new["metadata"] = {**meta, **{k: v for k, v in current["metadata"].items() if k in (
                    "name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                    "generation", "resourceVersion")}}
                if part == "main" and "status" in rtype.subresources:
                    new.pop("status", None)
                    new.update({"status": current["status"]} if "status" in current else {})
                if part == "main" and rtype.kind == "Namespace":
                    new["spec"] = current["spec"]
            _omit_empty(new["metadata"])
            if new == current:
                return copy.deepcopy(current)
            if admit is not None:
                admit(current, new)
            if "generation" in new["metadata"] and _spec_of(new) != _spec_of(current):
                new["metadata"]["generation"] += 1
            self._bump(new)
            self._objects[rtype.kind][(new["metadata"].get("namespace", ""), name)] = new
            self._record("MODIFIED", new)
            if _released(new):
                self._remove(new)
            return copy.deepcopy(new)

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, patch: Any,
              content_type: str, part: str = "main", admit: Admit | None = None) -> Obj:
        with self._cond:
            current = self._get(rtype, namespace, name)
            if content_type == "application/json-patch+json":
                patched = json_patch(current, patch)
            elif content_type in PATCH_TYPES:
                patched = merge_patch(current, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an "
                               f"unknown format - accepted media types include: "
                               f"{', '.join(PATCH_TYPES)} (server-side apply is not emulated)")
            return self.update(rtype, namespace, name, patched, part, admit=admit)

    def delete(self, rtype: ResourceType, namespace: str | None, name: str,
               propagation: str | None = None, grace_s: float | None = None
               ) -> tuple[Obj, bool]:
        """Returns the object and whether it is gone (else its deletion waits on finalizers, or
        on a Pod's termination). grace_s > 0 terminates a Pod gracefully: it stays, with
        deletionTimestamp and deletionGracePeriodSeconds, until a delete with grace_s=0; a
        plain delete (None) leaves a Pod terminating so, as a real one keeps its grace."""
        with self._cond:
            obj = self._get(rtype, namespace, name)
            meta = obj["metadata"]
            if rtype.kind == "Namespace" and meta.get("deletionTimestamp"):
                raise conflict(rtype, name, "The system is ensuring all content is removed from "
                               "this namespace.  Upon completion, this namespace will "
                               "automatically be purged by the system.")
            if rtype.kind == "Pod" and grace_s != 0 and (grace_s or _terminating(obj)):
                if not meta.get("deletionTimestamp"):
                    # the time after which it goes, as a real server sets it
                    meta["deletionTimestamp"] = now_rfc3339(grace_s or 0)
                    meta["deletionGracePeriodSeconds"] = math.ceil(grace_s or 0)
                    self._bump(obj)
                    self._record("MODIFIED", obj)
                return copy.deepcopy(obj), False
            if rtype.kind == "Pod" and _terminating(obj):  # grace_s=0: its grace ends now
                meta["deletionGracePeriodSeconds"] = 0
                if meta.get("finalizers"):
                    self._bump(obj)
                    self._record("MODIFIED", obj)
            if rtype.kind == "Namespace" or meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = now_rfc3339()
                    meta["deletionGracePeriodSeconds"] = 0
                    if rtype.kind == "Namespace":
                        obj["status"]["phase"] = "Terminating"
                    self._bump(obj)
                    self._record("MODIFIED", obj)
                return copy.deepcopy(obj), False
            self._remove(obj, propagation or ("Orphan" if rtype.orphan_by_default else
                                              "Background"))
            return copy.deepcopy(obj), True

    def _remove(self, obj: Obj, propagation: str = "Background") -> None:
        meta = obj["metadata"]
        del self._objects[obj["kind"]][(meta.get("namespace", ""), meta["name"])]
        self._bump(obj)
        self._record("DELETED", obj)
        if obj["kind"] == "Pod":
            for key in [k for k in self._logs if k[:2] == (meta["namespace"], meta["name"])]:
                del self._logs[key]
        for dependents in self._objects.values():  # the garbage collector, synchronously
            for dependent in list(dependents.values()):
                refs = dependent["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == meta["uid"] for ref in refs):
                    continue
                dmeta = dependent["metadata"]
                if propagation == "Orphan":
                    self.update(TYPES[dependent["kind"]], dmeta.get("namespace"), dmeta["name"], {
                        **dependent, "metadata": {**dmeta, "ownerReferences": [
                            r for r in refs if r.get("uid") != meta["uid"]]}}, part="all")
                elif (dmeta.get("namespace", ""), dmeta["name"]) in dependents:
                    self.delete(TYPES[dependent["kind"]], dmeta.get("namespace"), dmeta["name"])

    def watch(self, rtype: ResourceType, namespace: str | None, matches: Callable[[Obj], bool],
              resource_version: str, timeout_s: float) -> Iterator[tuple[str, Obj] | None]:
        """(type, object) for each change after resource_version (when "" or "0": the current
        objects as ADDED first), and None whenever idle for a while, until timeout or close()."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if resource_version in ("", "0"):
                cursor, backlog = self._rv, [("ADDED", o) for o in self.list(
                    rtype, namespace, matches)[0]]
            else:
                cursor, backlog = int(resource_version), []
        yield from backlog
        while True:
            with self._cond:
                if cursor < self._oldest_rv:
                    yield "ERROR", ApiError(410, "Expired", f"too old resource version: {cursor} "
                                            f"({self._oldest_rv})").status()
                    return
                changes = self._changes[bisect.bisect_right(self._changes, cursor,
                                                            key=lambda c: c.rv):]
                remaining = deadline - time.monotonic()
                if not changes and (self.closed or remaining <= 0):
                    return
                if changes:
                    cursor = changes[-1].rv
                else:
                    self._cond.wait(min(remaining, 1.0))
            yield None
            for change in changes:
                if change.kind == rtype.kind and namespace in (None, change.namespace) and \
                        matches(change.obj):
                    yield change.type, change.obj

    # Container logs, as a container runtime keeps them: timestamped lines per run of each
    # container (its container ID), the current run and the one before it.
    def set_log(self, namespace: str, pod: str, container: str, text: str,
                container_id: str | None = None) -> None:
        """The log of the container's run container_id (a new run, if it is not the latest;
        None: the latest run), replaced by text."""
        with self._cond:
            runs = self._logs.setdefault((namespace, pod, container), [])
            if not runs or container_id not in (None, runs[-1].container_id):
                runs.append(LogInstance(container_id or "", []))
                del runs[:-2]  # the kubelet keeps the previous run's log, no older one
            runs[-1].lines.clear()
            self.append_log(namespace, pod, container, text)

    def append_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        """Lines printed by the container's latest run."""
        with self._cond:
            runs = self._logs.setdefault((namespace, pod, container), [])
            if not runs:
                runs.append(LogInstance("", []))
            runs[-1].lines.extend((time.time_ns(), line) for line in text.splitlines())
            self._cond.notify_all()

    def log_lines(self, namespace: str, pod: str, container: str,
                  container_id: str | None = None) -> list[tuple[int, str]]:
        """The lines of the run container_id (None, or a run not kept: the latest)."""
        with self._cond:
            runs = self._logs.get((namespace, pod, container), [])
            run = next((r for r in runs if r.container_id == container_id), None) or (
                runs[-1] if runs else None)
            return list(run.lines) if run else []

    def follow_log(self, namespace: str, pod: str, container: str, start: int
                   ) -> Iterator[tuple[int, str] | None]:
        """Lines from index start on as they come, until the container stops running."""
        while True:
            with self._cond:
                runs = self._logs.get((namespace, pod, container), [])
                lines = runs[-1].lines if runs else []
                new, start = lines[start:], max(start, len(lines))
                if not new:
                    obj = self._objects["Pod"].get((namespace, pod))
                    states = [s.get("state", {}) for s in (obj or {}).get("status", {}).get(
                        "containerStatuses", []) if s["name"] == container]
                    if self.closed or not states or "running" not in states[0]:
                        return
                    self._cond.wait(1.0)
            yield from new or [None]


def _omit_empty(meta: Obj) -> None:
    """As the server serializes them (omitempty): no empty labels, finalizers, ..."""
    for field in ("labels", "annotations", "finalizers", "ownerReferences"):
        if field in meta and not meta[field]:
            del meta[field]


def _spec_of(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _released(obj: Obj) -> bool:
    """A deleted object whose finalizers are all gone is removed (a Pod once it terminated)."""
    return bool(obj["metadata"].get("deletionTimestamp")) and not obj["metadata"].get(
        "finalizers") and not (obj["kind"] == "Namespace" and obj["spec"].get(
            "finalizers")) and not _terminating(obj)


def _terminating(obj: Obj) -> bool:
    """A Pod deleted gracefully, still within its grace period."""
    return obj["kind"] == "Pod" and bool(obj["metadata"].get("deletionTimestamp")) and bool(
        obj["metadata"].get("deletionGracePeriodSeconds"))


# --- the wire format -----------------------------------------------------------------------

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
            body: Obj = VERSION
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
                              "status": "Success", "details": {**_details(rtype, name),
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
        pod = self.store.get(rtype, namespace, name)
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = self.params.get("container") or (containers[0] if len(containers) == 1 else "")
        if not container:
            raise bad_request(f"a container name must be specified for pod {name}, choose one "
                              f"of: [{' '.join(containers)}]")
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {name}")
        status = next((s for s in pod["status"].get("containerStatuses", [])
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
    gracefully meanwhile); `store.namespace_deletion_s` changes it on a running server."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1",
                 namespaces: tuple[str, ...] = DEFAULT_NAMESPACES, *,
                 authentication: bool = False, rbac: bool = False, tls: bool = False,
                 namespace_deletion_s: float = NAMESPACE_DELETION_S) -> None:
        self.store = ObjectStore(namespace_deletion_s=namespace_deletion_s)
        self.faults = FaultPlan()
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


# --- the controller: kubelet, scheduler and operators --------------------------------------

class Failure(StrEnum):
    """What goes wrong, per object. Which kinds take which: SUPPORTED_FAILURES."""

    CRASH_LOOP = "crash-loop"  # containers exit and restart: CrashLoopBackOff
    IMAGE_PULL = "image-pull"  # ErrImagePull, then ImagePullBackOff; the pod stays Pending
    UNSCHEDULABLE = "unschedulable"  # PodScheduled False, FailedScheduling
    PROGRESS_DEADLINE = "progress-deadline"  # pods never start; Progressing False
    FAIL = "fail"  # the container exits non-zero: Job, RayJob, SparkApplication fail
    STUCK_TERMINATING = "stuck-terminating"  # a finalizer that nobody removes


_POD_FAILURES = {Failure.CRASH_LOOP, Failure.IMAGE_PULL, Failure.UNSCHEDULABLE}
SUPPORTED_FAILURES: dict[str, set[Failure]] = {
    "Pod": _POD_FAILURES | {Failure.FAIL}, "Deployment": _POD_FAILURES | {
        Failure.PROGRESS_DEADLINE}, "StatefulSet": _POD_FAILURES, "Job": _POD_FAILURES | {
        Failure.FAIL}, "RayJob": {Failure.FAIL}, "SparkApplication": {Failure.FAIL},
    "Namespace": {Failure.STUCK_TERMINATING},
}
INHERITING_KINDS = ("Pod", "ReplicaSet", "Job")  # take their controlling owner's behaviour
STUCK_FINALIZER = "mlci.test/never-released"
NODE_NAME, NODE_IP = "mlci-node-1", "172.18.0.2"
TRACEBACK = """Traceback (most recent call last):
  File "/app/train.py", line 41, in <module>
    main()
  File "/app/train.py", line 37, in main
    raise RuntimeError("training diverged: loss is nan")
RuntimeError: training diverged: loss is nan"""


@dataclass(frozen=True)
class Behaviour:
    failure: Failure | None = None
    log: str | None = None  # what the containers print (default: a few lines per kind)
    exit_code: int = 1  # of a failing container
    run_s: float = 0.2  # how long a run-to-completion container runs


def owner_reference(owner: Obj) -> Obj:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}


def set_condition(conditions: list[Obj], type_: str, status: str, reason: str = "",
                  message: str = "", stamp_update: bool = False) -> None:
    """Sets a condition in place, left as it is when nothing changes; lastTransitionTime moves
    only when status does (lastUpdateTime, kept by Deployments, on any change)."""
    old = next((c for c in conditions if c["type"] == type_), None)
    if old and (old["status"], old.get("reason", ""), old.get("message", "")) == (
            status, reason, message):
        return
    now = now_rfc3339()
    new = {"type": type_, "status": status, **({"reason": reason} if reason else {}),
           **({"message": message} if message else {}),
           **({"lastUpdateTime": now} if stamp_update else {}),
           "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status
           else now}
    if old is None:
        conditions.append(new)
    else:
        conditions[conditions.index(old)] = new


def condition_is(obj: Obj, type_: str, status: str = "True") -> bool:
    return any(c["type"] == type_ and c["status"] == status
               for c in (obj.get("status") or {}).get("conditions") or [])


def pod_ready(pod: Obj) -> bool:
    return condition_is(pod, "Ready") and not pod["metadata"].get("deletionTimestamp")


class KubeController:
    """Runs in a thread every interval_s over the store and advances it as the kubelet,
    scheduler, namespace, ReplicaSet/Deployment/StatefulSet/Job controllers, KubeRay and the
    Spark operator would. Everything is healthy unless `behave` says otherwise for an object;
    a Pod, ReplicaSet or Job without a rule of its own follows its controlling owner's."""

    def __init__(self, api: KubeApiServer | ObjectStore, interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """clock: the time namespace deletion is measured by (a test may drive a fake one,
        calling tick() itself instead of start())."""
        self.store = api.store if isinstance(api, KubeApiServer) else api
        self.interval_s = interval_s
        self.clock = clock
        self._deleting_since: dict[str, float] = {}
        self.errors: list[str] = []  # unexpected exceptions of a reconcile, with tracebacks
        self._rules: list[tuple[str, str, str | None, Behaviour]] = []
        self._started: dict[str, float] = {}
        self._finished: dict[str, float] = {}
        self._event_names: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._pod_ips = itertools.count(2)
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reconcilers: list[tuple[str, Callable[[Obj], None]]] = [
            ("Namespace", self._namespace), ("Deployment", self._deployment),
            ("StatefulSet", self._statefulset), ("ReplicaSet", self._replicaset),
            ("RayJob", self._rayjob), ("RayCluster", self._raycluster),
            ("SparkApplication", self._sparkapplication), ("Job", self._job), ("Pod", self._pod)]

    def behave(self, kind: str, name: str = "*", *, namespace: str | None = None,
               failure: Failure | str | None = None, log: str | None = None,
               exit_code: int = 1, run_s: float = 0.2) -> Behaviour:
        """How objects of kind named like name (a glob) in namespace (None: any) behave; the
        latest matching rule wins. Register it before creating the object."""
        failure = Failure(failure) if failure is not None else None
        if kind not in SUPPORTED_FAILURES:
            raise ValueError(f"behave({kind!r}, {name!r}): the controller runs only "
                             f"{sorted(SUPPORTED_FAILURES)}")
        if failure is not None and failure not in SUPPORTED_FAILURES[kind]:
            raise ValueError(f"behave({kind!r}, {name!r}): failure {failure.value!r} is not "
                             f"emulated for a {kind}; it takes "
                             f"{sorted(f.value for f in SUPPORTED_FAILURES[kind])}")
        behaviour = Behaviour(failure, log, exit_code, run_s)
        self._rules.append((kind, name, namespace, behaviour))
        return behaviour

    def start(self) -> KubeController:
        self._thread = threading.Thread(target=self._run, name="kube-controller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> KubeController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def tick(self) -> None:
        """One pass of every reconciler over the objects it owns."""
        with self._tick_lock:
            for kind, reconcile in self._reconcilers:
                for obj in self.store.list(TYPES[kind])[0]:
                    try:
                        reconcile(obj)
                    except ApiError:
                        pass  # gone, conflicting or forbidden meanwhile: next tick sees anew
                    except Exception:  # kept for the test to report
                        self.errors.append(f"{kind} {obj['metadata']['name']}: "
                                           f"{traceback.format_exc()}")

    # --- helpers over the store
    def _behaviour(self, obj: Obj) -> Behaviour:
        for link in self._lineage(obj):
            meta = link["metadata"]
            for kind, pattern, namespace, behaviour in reversed(self._rules):
                if kind == link["kind"] and fnmatchcase(meta["name"], pattern) and \
                        namespace in (None, meta.get("namespace")):
                    return behaviour
        return Behaviour()

    def _lineage(self, obj: Obj) -> list[Obj]:
        """obj, then its controlling owner, and so on while the owner passes behaviour on."""
        chain = [obj]
        while chain[-1]["kind"] in INHERITING_KINDS:
            refs = [r for r in chain[-1]["metadata"].get("ownerReferences") or []
                    if r.get("controller") and r.get("kind") in TYPES]
            try:
                owner = self.store.get(TYPES[refs[0]["kind"]], obj["metadata"].get("namespace"),
                                       refs[0]["name"]) if refs else None
            except ApiError:
                owner = None
            if owner is None or owner["metadata"]["uid"] != refs[0]["uid"]:
                break
            chain.append(owner)
        return chain

    def _owned(self, kind: str, owner: Obj) -> list[Obj]:
        uid = owner["metadata"]["uid"]
        return self.store.list(TYPES[kind], owner["metadata"].get("namespace"), lambda o: any(
            r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or []))[0]

    def _write_status(self, obj: Obj, status: Obj) -> None:
        """Writes status (the store ignores a write that changes nothing)."""
        meta = obj["metadata"]
        self.store.update(TYPES[obj["kind"]], meta.get("namespace"), meta["name"],
                          {"status": status}, part="status")
        obj["status"] = status

    def _write_all(self, obj: Obj) -> None:
        """Writes spec and status of a snapshot: a Conflict if it went stale (next tick)."""
        meta = obj["metadata"]
        self.store.update(TYPES[obj["kind"]], meta.get("namespace"), meta["name"], obj,
                          part="all")

    def _create(self, kind: str, owner: Obj, body: Obj) -> Obj:
        body["metadata"]["ownerReferences"] = [owner_reference(owner)]
        return self.store.create(TYPES[kind], owner["metadata"]["namespace"], body)

    def _event(self, obj: Obj, type_: str, reason: str, message: str,
               component: str = "kubelet") -> None:
        """Records an Event as the components do: a repeat bumps count and lastTimestamp (at most
        once a second, as the recorder's aggregation roughly does)."""
        meta, now = obj["metadata"], now_rfc3339()
        namespace = meta.get("namespace") or "default"
        key = (meta["uid"], reason, message)
        name, last = self._event_names.get(key, ("", 0.0))
        with contextlib.suppress(ApiError):
            if name:
                if time.monotonic() - last >= 1:
                    event = self.store.get(TYPES["Event"], namespace, name)
                    self.store.patch(TYPES["Event"], namespace, name, {
                        "count": event.get("count", 1) + 1, "lastTimestamp": now},
                        "application/merge-patch+json")
                    self._event_names[key] = (name, time.monotonic())
                return
            name = f"{meta['name']}.{secrets.token_hex(8)}"
            self.store.create(TYPES["Event"], namespace, {
                "metadata": {"name": name, "namespace": namespace},
                "involvedObject": {"kind": obj["kind"], "namespace": meta.get("namespace"),
                                   "name": meta["name"], "uid": meta["uid"],
                                   "apiVersion": obj["apiVersion"],
                                   "resourceVersion": meta["resourceVersion"]},
                "reason": reason, "message": message, "type": type_, "count": 1,
                "source": {"component": component, **(
                    {"host": NODE_NAME} if component == "kubelet" else {})},
                "firstTimestamp": now, "lastTimestamp": now, "reportingComponent": component,
                "reportingInstance": NODE_NAME if component == "kubelet" else ""})
            self._event_names[key] = (name, time.monotonic())

    def _create_pod(self, owner: Obj, template: Obj, name: str, labels: Obj, component: str
                    ) -> None:
        meta = template.get("metadata") or {}
        self._create("Pod", owner, {
            "metadata": {"name": name, "labels": {**(meta.get("labels") or {}), **labels},
                         "annotations": dict(meta.get("annotations") or {})},
            "spec": copy.deepcopy(template.get("spec") or {})})
        self._event(owner, "Normal", "SuccessfulCreate", f"Created pod: {name}", component)

    # --- namespace and service account controllers
    def _namespace(self, ns: Obj) -> None:
        meta, name = ns["metadata"], ns["metadata"]["name"]
        if not meta.get("deletionTimestamp"):
            if self._behaviour(ns).failure is Failure.STUCK_TERMINATING and \
                    STUCK_FINALIZER not in meta.get("finalizers", []):
                meta["finalizers"] = [*meta.get("finalizers", []), STUCK_FINALIZER]
                self._write_all(ns)
            with contextlib.suppress(ApiError):
                if not self.store.list(TYPES["ServiceAccount"], name,
                                       lambda o: o["metadata"]["name"] == "default")[0]:
                    self.store.create(TYPES["ServiceAccount"], name,
                                      {"metadata": {"name": "default"}})
            return
        # The namespace takes store.namespace_deletion_s to go: its pods terminate gracefully
        # over that time (as a real namespace waits out their grace periods), the rest of its
        # content goes at once.
        since = self._deleting_since.setdefault(meta["uid"], self.clock())
        left_s = self.store.namespace_deletion_s - (self.clock() - since)
        remaining: list[Obj] = []
        for rtype in (t for t in RESOURCE_TYPES if t.namespaced):
            for obj in self.store.list(rtype, name)[0]:
                grace = None if rtype.kind != "Pod" else max(left_s, 1) if left_s > 0 else 0
                if not obj["metadata"].get("deletionTimestamp") or (
                        grace == 0 and _terminating(obj)):
                    with contextlib.suppress(ApiError):
                        obj, gone = self.store.delete(rtype, name, obj["metadata"]["name"],
                                                      grace_s=grace)
                        if gone:
                            continue
                remaining.append(obj)
        held = Counter(f for o in remaining for f in o["metadata"].get("finalizers", []))
        own = [f for f in ns["spec"].get("finalizers", []) if f != "kubernetes"] + meta.get(
            "finalizers", [])
        # as the namespace controller names them: <resource>.<group> ("pods." for the core group)
        kinds = Counter(f"{TYPES[o['kind']].plural}.{TYPES[o['kind']].group}" for o in remaining)
        conditions = copy.deepcopy(ns["status"].get("conditions", []))
        set_condition(conditions, "NamespaceDeletionDiscoveryFailure", "False",
                      "ResourcesDiscovered", "All resources successfully discovered")
        set_condition(conditions, "NamespaceDeletionGroupVersionParsingFailure", "False",
                      "ParsedGroupVersions", "All legacy kube types successfully parsed")
        set_condition(conditions, "NamespaceDeletionContentFailure", "False", "ContentDeleted",
                      "All content successfully deleted, may be waiting on finalization")
        set_condition(conditions, "NamespaceContentRemaining", *(
            ("True", "SomeResourcesRemain", "Some resources are remaining: " + ", ".join(
                f"{k} has {n} resource instances" for k, n in sorted(kinds.items())))
            if remaining else ("False", "ContentRemoved", "All content successfully removed")))
        set_condition(conditions, "NamespaceFinalizersRemaining", *(
            ("True", "SomeFinalizersRemain", "; ".join(
                (["Some content in the namespace has finalizers remaining: " + ", ".join(
                    f"{f} in {n} resource instances" for f, n in sorted(held.items()))]
                 if held else []) + ([f"Some finalizers remain on the namespace: "
                                      f"{', '.join(own)}"] if own else [])))
            if held or own else ("False", "ContentHasNoFinalizers",
                                 "All content-preserving finalizers finished")))
        self._write_status(ns, {**ns["status"], "conditions": conditions})
        if not remaining and left_s <= 0 and "kubernetes" in ns["spec"].get("finalizers", []):
            self.store.update(TYPES["Namespace"], None, name, {"spec": {"finalizers": [
                f for f in ns["spec"]["finalizers"] if f != "kubernetes"]}}, part="finalize")

    # --- workload controllers
    def _deployment(self, deployment: Obj) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        template, replicas = spec.get("template") or {}, spec.get("replicas", 1)
        pod_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        rs_name = f"{meta['name']}-{pod_hash}"
        current = None
        for rs in self._owned("ReplicaSet", deployment):
            if rs["metadata"]["name"] == rs_name:
                current = rs
            else:
                self.store.delete(TYPES["ReplicaSet"], meta["namespace"], rs["metadata"]["name"])
        if current is None:
            labels = {**((template.get("metadata") or {}).get("labels") or {}),
                      "pod-template-hash": pod_hash}
            current = self._create("ReplicaSet", deployment, {
                "metadata": {"name": rs_name, "labels": labels, "annotations": {
                    "deployment.kubernetes.io/revision": str(meta.get("generation", 1))}},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {**(
                    spec.get("selector") or {}).get("matchLabels", {}), "pod-template-hash":
                    pod_hash}}, "template": {**template, "metadata": {
                        **(template.get("metadata") or {}), "labels": labels}}}})
            self._event(deployment, "Normal", "ScalingReplicaSet",
                        f"Scaled up replica set {rs_name} from 0 to {replicas}",
                        "deployment-controller")
        elif current["spec"].get("replicas") != replicas:
            current["spec"]["replicas"] = replicas
            self._write_all(current)
        pods = self._owned("Pod", current)
        ready = sum(map(pod_ready, pods))
        stuck = self._behaviour(deployment).failure is Failure.PROGRESS_DEADLINE
        conditions = copy.deepcopy((deployment.get("status") or {}).get("conditions", []))
        available = ready >= replicas - replicas // 4  # maxUnavailable 25%, rounded down
        set_condition(conditions, "Available", *(
            ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            if available else ("False", "MinimumReplicasUnavailable",
                               "Deployment does not have minimum availability.")),
            stamp_update=True)
        progressing = next((c for c in conditions if c["type"] == "Progressing"), None)
        set_condition(conditions, "Progressing", *(
            ("False", "ProgressDeadlineExceeded",
             f'ReplicaSet "{rs_name}" has timed out progressing.') if stuck and progressing else
            ("True", "NewReplicaSetAvailable",
             f'ReplicaSet "{rs_name}" has successfully progressed.') if ready >= replicas else
            ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')),
            stamp_update=True)
        self._write_status(deployment, {k: v for k, v in {
            "observedGeneration": meta.get("generation", 1), "replicas": len(pods),
            "updatedReplicas": len(pods), "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": max(replicas - ready, 0), "conditions": conditions,
        }.items() if v or k in ("observedGeneration", "conditions")})

    def _replicaset(self, rs: Obj) -> None:
        replicas = rs["spec"].get("replicas", 1)
        pods = [p for p in self._owned("Pod", rs) if not p["metadata"].get("deletionTimestamp")]
        for pod in pods[replicas:]:
            self.store.delete(TYPES["Pod"], rs["metadata"]["namespace"], pod["metadata"]["name"])
        for _ in range(replicas - len(pods)):
            self._create_pod(rs, rs["spec"].get("template") or {},
                             f"{rs['metadata']['name']}-{random_suffix()}", {},
                             "replicaset-controller")
        ready = sum(map(pod_ready, pods[:replicas]))
        self._write_status(rs, {"replicas": min(len(pods), replicas), "readyReplicas": ready,
                                "availableReplicas": ready, "fullyLabeledReplicas": len(pods),
                                "observedGeneration": rs["metadata"].get("generation", 1)})

    def _statefulset(self, sts: Obj) -> None:
        """Pods <name>-0, -1, ... one at a time, each once the ones before are ready."""
        name, replicas = sts["metadata"]["name"], sts["spec"].get("replicas", 1)
        pods = {p["metadata"]["name"]: p for p in self._owned("Pod", sts)}
        for ordinal in range(replicas):
            pod_name = f"{name}-{ordinal}"
            if pod_name not in pods:
                self._create_pod(sts, sts["spec"].get("template") or {}, pod_name, {
                    "statefulset.kubernetes.io/pod-name": pod_name,
                    "apps.kubernetes.io/pod-index": str(ordinal)}, "statefulset-controller")
                break
            if not pod_ready(pods[pod_name]):
                break
        for pod_name in pods.keys() - {f"{name}-{i}" for i in range(replicas)}:
            self.store.delete(TYPES["Pod"], sts["metadata"]["namespace"], pod_name)
        ready = sum(map(pod_ready, pods.values()))
        self._write_status(sts, {"replicas": len(pods), "readyReplicas": ready,
                                 "availableReplicas": ready, "currentReplicas": len(pods),
                                 "updatedReplicas": len(pods),
                                 "observedGeneration": sts["metadata"].get("generation", 1)})

    def _job(self, job: Obj) -> None:
        if condition_is(job, "Complete") or condition_is(job, "Failed"):
            return
        meta, status = job["metadata"], copy.deepcopy(job.get("status") or {})
        pods = self._owned("Pod", job)
        phases = Counter(p["status"].get("phase") for p in pods)
        active = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        conditions = status.setdefault("conditions", [])
        status.setdefault("startTime", now_rfc3339())
        for field, value in (("active", len(active)), ("ready", sum(map(pod_ready, active))),
                             ("succeeded", phases["Succeeded"]), ("failed", phases["Failed"])):
            status.pop(field, None)
            status.update({field: value} if value or field == "ready" else {})
        if phases["Succeeded"]:
            message = "Reached expected number of succeeded pods"
            set_condition(conditions, "SuccessCriteriaMet", "True", "CompletionsReached", message)
            set_condition(conditions, "Complete", "True", "CompletionsReached", message)
            status["completionTime"] = now_rfc3339()
            self._event(job, "Normal", "Completed", "Job completed", "job-controller")
        elif phases["Failed"] > job["spec"].get("backoffLimit", 6):
            message = "Job has reached the specified backoff limit"
            set_condition(conditions, "FailureTarget", "True", "BackoffLimitExceeded", message)
            set_condition(conditions, "Failed", "True", "BackoffLimitExceeded", message)
            self._event(job, "Warning", "BackoffLimitExceeded", message, "job-controller")
        elif not active:
            template = job["spec"].get("template") or {}
            labels = {"batch.kubernetes.io/controller-uid": meta["uid"],
                      "batch.kubernetes.io/job-name": meta["name"],
                      "controller-uid": meta["uid"], "job-name": meta["name"]}
            self._create_pod(job, template, f"{meta['name']}-{random_suffix()}", labels,
                             "job-controller")
        if not conditions:
            del status["conditions"]
        self._write_status(job, status)

    # --- KubeRay and the Spark operator
    def _rayjob(self, rayjob: Obj) -> None:
        meta, spec = rayjob["metadata"], rayjob.get("spec") or {}
        status = copy.deepcopy(rayjob.get("status") or {})
        deployment = status.get("jobDeploymentStatus", "")
        now = now_rfc3339()
        if deployment in ("Complete", "Failed"):
            self._finished.setdefault(meta["uid"], time.monotonic())
            if spec.get("shutdownAfterJobFinishes") and time.monotonic() - self._finished[
                    meta["uid"]] >= spec.get("ttlSecondsAfterFinished", 0):
                with contextlib.suppress(ApiError):
                    self.store.delete(TYPES["RayCluster"], meta["namespace"],
                                      status["rayClusterName"])
            return
        if deployment == "":
            cluster = f"{meta['name']}-raycluster-{random_suffix()}"
            self._create("RayCluster", rayjob, {"metadata": {"name": cluster, "labels": {
                "ray.io/originated-from-crd": "RayJob",
                "ray.io/originated-from-cr-name": meta["name"]}},
                "spec": copy.deepcopy(spec.get("rayClusterSpec") or {})})
            status.update(jobId=spec.get("jobId") or f"{meta['name']}-{random_suffix()}",
                          rayClusterName=cluster, jobDeploymentStatus="Initializing",
                          jobStatus="", startTime=now, observedGeneration=meta["generation"],
                          dashboardURL=f"{cluster}-head-svc.{meta['namespace']}.svc.cluster."
                                       "local:8265")
        elif deployment == "Initializing":
            cluster = self.store.get(TYPES["RayCluster"], meta["namespace"],
                                     status["rayClusterName"])
            if (cluster.get("status") or {}).get("state") != "ready":
                return
            status.update(jobDeploymentStatus="Running", jobStatus="PENDING",
                          rayClusterStatus=cluster["status"])
            image = next(iter((cluster["spec"].get("headGroupSpec") or {}).get("template", {})
                              .get("spec", {}).get("containers", [])), {}).get(
                "image", "rayproject/ray:2.9.0")
            self._create("Job", rayjob, {
                "metadata": {"name": meta["name"], "labels": {
                    "ray.io/originated-from-crd": "RayJob",
                    "ray.io/originated-from-cr-name": meta["name"],
                    "app.kubernetes.io/created-by": "kuberay-operator"}},
                "spec": {"backoffLimit": 2, "template": {"spec": {
                    "restartPolicy": "Never", "containers": [{
                        "name": "ray-job-submitter", "image": image,
                        "command": ["/bin/bash", "-ce", "--"],
                        "args": [f"ray job submit --address http://{status['dashboardURL']} "
                                 f"--submission-id {status['jobId']} -- "
                                 f"{spec.get('entrypoint', '')}"]}]}}}})
        else:
            pods = self.store.list(TYPES["Pod"], meta["namespace"], lambda p: p["metadata"].get(
                "labels", {}).get("job-name") == meta["name"])[0]
            done = next((p for p in pods if p["status"].get("phase") in (
                "Succeeded", "Failed")), None)
            behaviour = self._behaviour(rayjob)
            if done is not None and behaviour.failure is Failure.FAIL:  # as the dashboard says
                tail = "\n".join(line for _, line in self.store.log_lines(
                    meta["namespace"], done["metadata"]["name"], "ray-job-submitter"))
                status.update(jobStatus="FAILED", jobDeploymentStatus="Failed",
                              reason="AppFailed", endTime=now, message=(
                                  f"Job entrypoint command failed with exit code "
                                  f"{behaviour.exit_code}, last available logs (truncated to "
                                  f"20,000 chars):\n{tail[-20_000:]}"))
            elif done is not None:
                status.update(jobStatus="SUCCEEDED", jobDeploymentStatus="Complete", endTime=now,
                              message="Job finished successfully.")
            elif any(p["status"].get("phase") == "Running" for p in pods):
                status.update(jobStatus="RUNNING")
        self._write_status(rayjob, status)

    def _raycluster(self, cluster: Obj) -> None:
        meta, spec = cluster["metadata"], cluster.get("spec") or {}
        name, namespace = meta["name"], meta["namespace"]
        service = f"{name}-head-svc"
        ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
        if not self.store.list(TYPES["Service"], namespace,
                               lambda o: o["metadata"]["name"] == service)[0]:
            self._create("Service", cluster, {
                "metadata": {"name": service, "labels": {"ray.io/cluster": name}},
                "spec": {"selector": {"ray.io/cluster": name, "ray.io/node-type": "head"},
                         "ports": [{"name": k, "port": v} for k, v in ports.items()]}})
        heads = self._owned("Pod", cluster)
        template = (spec.get("headGroupSpec") or {}).get("template") or {"spec": {
            "containers": [{"name": "ray-head", "image": "rayproject/ray:2.9.0"}]}}
        if not heads:
            self._create_pod(cluster, template, f"{name}-head-{random_suffix()}", {
                "ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/group": "headgroup",
                "ray.io/is-ray-node": "yes"}, "raycluster-controller")
            return
        head, ready = heads[0], pod_ready(heads[0])
        conditions = copy.deepcopy((cluster.get("status") or {}).get("conditions", []))
        set_condition(conditions, "HeadPodReady", *(("True", "HeadPodRunningAndReady") if ready
                                                    else ("False", "HeadPodNotFound")))
        set_condition(conditions, "RayClusterProvisioned", *(
            ("True", "AllPodRunningAndReadyFirstTime") if ready else ("False",
                                                                      "RayClusterPodsProvisioning")))
        svc = self.store.get(TYPES["Service"], namespace, service)
        self._write_status(cluster, {
            "state": "ready" if ready else "", "conditions": conditions,
            "desiredWorkerReplicas": sum(g.get("replicas", 0) for g in spec.get(
                "workerGroupSpecs") or []), "readyWorkerReplicas": 0,
            "endpoints": {k: str(v) for k, v in ports.items()},
            "head": {"podName": head["metadata"]["name"], "podIP": head["status"].get("podIP", ""),
                     "serviceName": service, "serviceIP": svc["spec"].get("clusterIP", "")},
            "observedGeneration": meta["generation"]})

    def _sparkapplication(self, app: Obj) -> None:
        meta, spec = app["metadata"], app.get("spec") or {}
        status = copy.deepcopy(app.get("status") or {})
        state = (status.get("applicationState") or {}).get("state", "")
        driver_name = (status.get("driverInfo") or {}).get("podName", f"{meta['name']}-driver")
        now = now_rfc3339()
        if state in ("COMPLETED", "FAILED"):
            return
        if state == "":
            driver = spec.get("driver") or {}
            app_id = f"spark-{secrets.token_hex(16)}"
            submission = str(uuid.uuid4())
            self._create("Pod", app, {"metadata": {"name": driver_name, "labels": {
                **(driver.get("labels") or {}), "spark-role": "driver",
                "sparkoperator.k8s.io/app-name": meta["name"],
                "sparkoperator.k8s.io/launched-by-spark-operator": "true",
                "sparkoperator.k8s.io/submission-id": submission, "spark-app-selector": app_id,
                "spark-app-name": meta["name"], "spark-version": spec.get("sparkVersion", "")}},
                "spec": {"restartPolicy": "Never", **({"serviceAccountName": driver[
                    "serviceAccount"]} if driver.get("serviceAccount") else {}), "containers": [{
                        "name": "spark-kubernetes-driver", "image": spec.get("image", ""),
                        "args": ["driver", "--class", spec.get("mainClass", ""),
                                 spec.get("mainApplicationFile", ""),
                                 *spec.get("arguments", [])]}]}})
            status.update(sparkApplicationId=app_id, submissionID=submission,
                          submissionAttempts=1, lastSubmissionAttemptTime=now,
                          applicationState={"state": "SUBMITTED"}, executorState={},
                          driverInfo={"podName": driver_name, "webUIPort": 4040,
                                      "webUIServiceName": f"{meta['name']}-ui-svc"})
        elif state in ("SUCCEEDING", "FAILING"):
            status.update(applicationState={**status["applicationState"], "state": {
                "SUCCEEDING": "COMPLETED", "FAILING": "FAILED"}[state]}, terminationTime=now)
        else:
            try:
                driver = self.store.get(TYPES["Pod"], meta["namespace"], driver_name)
            except ApiError:
                driver = None
            phase = driver["status"].get("phase") if driver else "Missing"
            if phase == "Failed" and driver is not None:
                code = driver["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
                status["applicationState"] = {"state": "FAILING", "errorMessage": (
                    f"driver container failed with ExitCode: {code}, Reason: Error")}
            elif phase == "Missing":
                status["applicationState"] = {"state": "FAILING",
                                              "errorMessage": "driver pod not found"}
            elif phase == "Succeeded":
                status["applicationState"] = {"state": "SUCCEEDING"}
            elif phase == "Running":
                status["applicationState"] = {"state": "RUNNING"}
                status["driverInfo"]["podIP"] = driver["status"].get("podIP", "")
        self._write_status(app, status)

    # --- scheduler and kubelet
    def _pod(self, pod: Obj) -> None:
        behaviour = self._behaviour(pod)
        failure = behaviour.failure
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        if meta.get("deletionTimestamp"):
            return  # terminating: whoever deleted it removes it when its grace ends
        containers = spec.get("containers") or []
        conditions = status.setdefault("conditions", [])
        if not spec.get("nodeName"):
            if failure is Failure.UNSCHEDULABLE:
                message = ("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes "
                           "are available: 1 No preemption victims found for incoming pod.")
                set_condition(conditions, "PodScheduled", "False", "Unschedulable", message)
                self._write_status(pod, status)
                self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
                return
            spec["nodeName"] = NODE_NAME
            set_condition(conditions, "PodScheduled", "True")
            status.update(hostIP=NODE_IP, containerStatuses=[_container_status(
                c, {"waiting": {"reason": "ContainerCreating"}}) for c in containers])
            self._write_all(pod)
            self._event(pod, "Normal", "Scheduled", f"Successfully assigned {namespace}/{name} "
                        f"to {NODE_NAME}", "default-scheduler")
            return
        phase = status.get("phase")
        if phase == "Pending" and failure is Failure.IMAGE_PULL:
            first = all(s["state"].get("waiting", {}).get("reason") == "ContainerCreating"
                        for s in status.get("containerStatuses", []))
            for c in containers:
                reason = "ErrImagePull" if first else "ImagePullBackOff"
                message = (f'failed to pull and unpack image "{c.get("image")}": not found' if
                           first else f'Back-off pulling image "{c.get("image")}"')
                self._event(pod, "Normal", "Pulling", f'Pulling image "{c.get("image")}"')
                self._event(pod, "Warning", "Failed", f'Failed to pull image "{c.get("image")}":'
                            f" rpc error: code = NotFound desc = {message}")
                self._event(pod, "Warning", "Failed", f"Error: {reason}")
                if not first:
                    self._event(pod, "Normal", "BackOff", message)
            status["containerStatuses"] = [_container_status(c, {"waiting": {
                "reason": "ErrImagePull" if first else "ImagePullBackOff",
                "message": f'Back-off pulling image "{c.get("image")}"'}}) for c in containers]
            self._write_status(pod, status)
        elif phase == "Pending" and failure is not Failure.PROGRESS_DEADLINE:
            self._start(pod, behaviour)
        elif phase == "Running" and failure is Failure.CRASH_LOOP and spec.get(
                "restartPolicy") != "Never":
            statuses = status["containerStatuses"]
            for c, s in zip(containers, statuses, strict=False):
                # The run that crashed: the one started, then one more per back-off.
                crashed = s.get("containerID") if "running" in s["state"] else None
                crashed = crashed or new_container_id()
                if crashed != s.get("containerID"):
                    self.store.set_log(namespace, name, c["name"],
                                       self._log_text(pod, behaviour, c), crashed)
                s.update(ready=False, started=False, restartCount=s["restartCount"] + 1,
                         containerID=crashed, lastState={"terminated": {
                             "exitCode": behaviour.exit_code, "reason": "Error",
                             "startedAt": s["state"].get("running", {}).get(
                                 "startedAt", now_rfc3339()),
                             "finishedAt": now_rfc3339(), "containerID": crashed}},
                         state={"waiting": {"reason": "CrashLoopBackOff", "message": (
                             f"back-off {min(10 * 2 ** s['restartCount'], 300)}s restarting "
                             f"failed container={c['name']} pod={name}_{namespace}({uid})")}})
                self._event(pod, "Warning", "BackOff", f"Back-off restarting failed container "
                            f"{c['name']} in pod {name}_{namespace}({uid})")
            unready = f"containers with unready status: [{' '.join(c['name'] for c in containers)}]"
            set_condition(conditions, "Ready", "False", "ContainersNotReady", unready)
            set_condition(conditions, "ContainersReady", "False", "ContainersNotReady", unready)
            self._write_status(pod, status)
        elif phase == "Running" and spec.get("restartPolicy") != "Always" and (
                time.monotonic() - self._started.setdefault(uid, time.monotonic())
                >= behaviour.run_s):
            # a RayJob's submitter ends with `ray job logs --follow`: 0 whatever the job did
            code = behaviour.exit_code if failure in (Failure.FAIL, Failure.CRASH_LOOP) and all(
                o["kind"] != "RayJob" for o in self._lineage(pod)) else 0
            for s in status["containerStatuses"]:
                s.update(ready=False, started=False, state={"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                    "startedAt": s["state"].get("running", {}).get("startedAt", now_rfc3339()),
                    "finishedAt": now_rfc3339(), "containerID": s.get("containerID", "")}})
            status["phase"] = "Succeeded" if code == 0 else "Failed"
            set_condition(conditions, "Ready", "False", "PodCompleted")
            set_condition(conditions, "ContainersReady", "False", "PodCompleted")
            self._write_status(pod, status)

    def _start(self, pod: Obj, behaviour: Behaviour) -> None:
        meta, status, now = pod["metadata"], pod["status"], now_rfc3339()
        containers = pod["spec"].get("containers") or []
        runs = {c["name"]: new_container_id() for c in containers}
        for c in containers:
            self._event(pod, "Normal", "Pulled", f'Container image "{c.get("image")}" already '
                        "present on machine")
            self._event(pod, "Normal", "Created", f"Created container {c['name']}")
            self.store.set_log(meta["namespace"], meta["name"], c["name"],
                               self._log_text(pod, behaviour, c), runs[c["name"]])
            self._event(pod, "Normal", "Started", f"Started container {c['name']}")
        ip = f"10.244.0.{next(self._pod_ips) % 250 + 2}"
        status.update(phase="Running", startTime=now, podIP=ip, podIPs=[{"ip": ip}],
                      containerStatuses=[_container_status(c, {"running": {"startedAt": now}},
                                                           True, runs[c["name"]])
                                         for c in containers])
        for type_ in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady"):
            set_condition(status["conditions"], type_, "True")
        self._started[meta["uid"]] = time.monotonic()
        self._write_status(pod, status)

    def _log_text(self, pod: Obj, behaviour: Behaviour, container: Obj) -> str:
        """The container's output: the rule's log, else a few lines as its kind would print;
        a RayJob's submitter prints the driver log inside `ray job submit`'s own lines."""
        lineage = self._lineage(pod)
        failing = behaviour.failure in (Failure.FAIL, Failure.CRASH_LOOP)
        body = behaviour.log if behaviour.log is not None else TRACEBACK if failing else None
        rayjob = next((o for o in lineage if o["kind"] == "RayJob"), None)
        if rayjob is not None:
            job_id = (rayjob.get("status") or {}).get("jobId", "")
            banner = "-" * 42
            return "\n".join([
                f"INFO cli.py:36 -- Job submission server address: http://"
                f"{(rayjob.get('status') or {}).get('dashboardURL', '')}",
                f"SUCC cli.py:60 -- Job '{job_id}' submitted successfully",
                "INFO cli.py:285 -- Tailing logs until the job exits (disable with --no-wait):",
                body if body is not None else "training finished: accuracy=0.93", banner,
                f"ERR cli.py:71 -- Job '{job_id}' failed" if failing else
                f"SUCC cli.py:60 -- Job '{job_id}' succeeded", banner])
        if any(o["kind"] == "SparkApplication" for o in lineage):
            name = pod["metadata"]["labels"].get("sparkoperator.k8s.io/app-name", "")
            return "\n".join([
                "INFO SparkContext: Running Spark version 3.5.1",
                f"INFO SparkContext: Submitted application: {name}",
                (f'Exception in thread "main" org.apache.spark.SparkException: {body}' if failing
                 else body if body is not None else "Pi is roughly 3.141592"),
                "INFO SparkContext: Successfully stopped SparkContext"])
        if body is not None:
            return body
        name = container["name"]
        done = [f"{name}: done"] if pod["spec"].get("restartPolicy") != "Always" else []
        return "\n".join([f"{name}: starting", f"{name}: ready", *done])


def new_container_id() -> str:
    return f"containerd://{secrets.token_hex(32)}"


def _container_status(container: Obj, state: Obj, ready: bool = False,
                      container_id: str | None = None) -> Obj:
    image = container.get("image", "")
    started = "running" in state
    return {"name": container["name"], "image": image, "ready": ready, "started": started,
            "restartCount": 0, "state": state, "lastState": {},
            "imageID": f"{image}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"
            if started else "", **({"containerID": container_id} if container_id else {})}
