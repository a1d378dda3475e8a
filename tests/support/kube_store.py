"""The state of the loopback Kubernetes API emulation and the rules it keeps, without HTTP:
the resource types it serves, `ObjectStore` (objects by kind, namespace and name, the history of
their changes that watches replay, container logs), label and field selectors, merge and JSON
patches, and the `ApiError`s (`kind: Status` bodies) its rules refuse with; plus the time
helpers the emulation shares. tests/support/kube_wire.py serves this state over HTTP;
tests/support/kube_controller.py advances it as the kubelet and the operators would.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

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
SPECLESS_KINDS = ("ConfigMap", "Secret", "Event", "ServiceAccount", "Role", "RoleBinding",
                  "ClusterRole", "ClusterRoleBinding")
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


def details(rtype: ResourceType, name: str) -> Obj:
    return {"name": name, **({"group": rtype.group} if rtype.group else {}), "kind": rtype.plural}


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.resource} "{name}" not found', details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.resource} "{name}": '
                    f"{why}", details(rtype, name))


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
                               details(rtype, name))
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
                           f"forbidden: {why}", {**details(rtype, meta.get("name", "")),
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
            if rtype.kind == "Pod" and grace_s != 0 and (grace_s or terminating(obj)):
                if not meta.get("deletionTimestamp"):
                    # the time after which it goes, as a real server sets it
                    meta["deletionTimestamp"] = now_rfc3339(grace_s or 0)
                    meta["deletionGracePeriodSeconds"] = math.ceil(grace_s or 0)
                    self._bump(obj)
                    self._record("MODIFIED", obj)
                return copy.deepcopy(obj), False
            if rtype.kind == "Pod" and terminating(obj):  # grace_s=0: its grace ends now
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
                    status = (obj or {}).get("status", {})
                    states = [s.get("state", {}) for s in [
                        *status.get("containerStatuses", []),
                        *status.get("initContainerStatuses", [])] if s["name"] == container]
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
            "finalizers")) and not terminating(obj)


def terminating(obj: Obj) -> bool:
    """A Pod deleted gracefully, still within its grace period."""
    return obj["kind"] == "Pod" and bool(obj["metadata"].get("deletionTimestamp")) and bool(
        obj["metadata"].get("deletionGracePeriodSeconds"))


# --- reading objects -----------------------------------------------------------------------

def condition_is(obj: Obj, type_: str, status: str = "True") -> bool:
    return any(c["type"] == type_ and c["status"] == status
               for c in (obj.get("status") or {}).get("conditions") or [])


def pod_ready(pod: Obj) -> bool:
    return condition_is(pod, "Ready") and not pod["metadata"].get("deletionTimestamp")
