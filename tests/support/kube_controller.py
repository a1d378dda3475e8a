"""The controller of the loopback Kubernetes API emulation: `KubeController` advances the state
in tests/support/kube_store.py as the kubelet, scheduler and controllers (namespace,
ReplicaSet/Deployment/StatefulSet/Job, KubeRay, the Spark operator) would: healthy by default,
failing for the objects `KubeController.behave` names (kind, name glob, namespace). It writes
the store directly, never through the wire (tests/support/kube_wire.py).

Containers do not run: what they print, how they exit and which files they write come from the
`Behaviour` a test gives. Init containers run in the kubelet's order, compressed into one step:
each regular one to completion, each native sidecar (`restartPolicy: Always`, Kubernetes 1.29)
started and left running (`initContainerStatuses`); the main containers then run; once they have
all ended, the sidecars are stopped (SIGTERM), and only when those have ended too does the pod
take its phase, decided by the main containers alone, as the kubelet does since 1.27. A native
sidecar whose command is a shell script is the one exception: it runs for real, on this
machine, over the pod's volumes (tests/support/kube_containers.py says how and why), so that
what it prints is what its script makes of the files the main containers wrote.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import secrets
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Protocol

from tests.support.kube_containers import PodContainers, is_native_sidecar
from tests.support.kube_store import (
    RESOURCE_TYPES,
    TYPES,
    ApiError,
    Obj,
    ObjectStore,
    condition_is,
    now_rfc3339,
    pod_ready,
    random_suffix,
    terminating,
)

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
    # What the main containers write as they end (path in the pod, content): into the volume
    # mounted where a path is, for the pod's other containers to read; else nowhere they see.
    files: tuple[tuple[str, bytes], ...] = ()


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


class HoldsStore(Protocol):
    """What serves an ObjectStore: a KubeApiServer (tests/support/kube_wire.py), which the
    controller takes without importing the wire."""

    store: ObjectStore


class KubeController:
    """Runs in a thread every interval_s over the store and advances it as the kubelet,
    scheduler, namespace, ReplicaSet/Deployment/StatefulSet/Job controllers, KubeRay and the
    Spark operator would. Everything is healthy unless `behave` says otherwise for an object;
    a Pod, ReplicaSet or Job without a rule of its own follows its controlling owner's."""

    def __init__(self, api: HoldsStore | ObjectStore, interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """clock: the time namespace deletion is measured by (a test may drive a fake one,
        calling tick() itself instead of start())."""
        self.store = api if isinstance(api, ObjectStore) else api.store
        self.interval_s = interval_s
        self.clock = clock
        self._deleting_since: dict[str, float] = {}
        self.errors: list[str] = []  # unexpected exceptions of a reconcile, with tracebacks
        self._rules: list[tuple[str, str, str | None, Behaviour]] = []
        self._started: dict[str, float] = {}
        self._finished: dict[str, float] = {}
        self._event_names: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._pod_ips = itertools.count(2)
        self.containers = PodContainers()  # pod volumes, and the sidecar scripts that run
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
               exit_code: int = 1, run_s: float = 0.2,
               files: dict[str, str | bytes] | None = None) -> Behaviour:
        """How objects of kind named like name (a glob) in namespace (None: any) behave; the
        latest matching rule wins. Register it before creating the object. `files`: what the
        main containers of its pods write as they end (absolute path in the pod: content)."""
        failure = Failure(failure) if failure is not None else None
        if kind not in SUPPORTED_FAILURES:
            raise ValueError(f"behave({kind!r}, {name!r}): the controller runs only "
                             f"{sorted(SUPPORTED_FAILURES)}")
        if failure is not None and failure not in SUPPORTED_FAILURES[kind]:
            raise ValueError(f"behave({kind!r}, {name!r}): failure {failure.value!r} is not "
                             f"emulated for a {kind}; it takes "
                             f"{sorted(f.value for f in SUPPORTED_FAILURES[kind])}")
        if any(not path.startswith("/") for path in files or {}):
            raise ValueError(f"behave({kind!r}, {name!r}): files are named by their absolute "
                             "path in the pod")
        behaviour = Behaviour(failure, log, exit_code, run_s, tuple(
            (path, content.encode() if isinstance(content, str) else content)
            for path, content in (files or {}).items()))
        self._rules.append((kind, name, namespace, behaviour))
        return behaviour

    def start(self) -> KubeController:
        self._thread = threading.Thread(target=self._run, name="kube-controller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread, then kills what still runs in the pods and removes their volumes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._tick_lock:
            self.containers.close()

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
            live = {p["metadata"]["uid"] for p in self.store.list(TYPES["Pod"])[0]}
            for uid in self.containers.uids() - live:  # deleted: what ran in it goes too
                self.containers.forget(uid)

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
                        grace == 0 and terminating(obj)):
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
            # terminating: whoever deleted it removes it when its grace ends; a sidecar that
            # runs gets its SIGTERM meanwhile
            for container in spec.get("initContainers") or []:
                self.containers.stop(pod, container["name"])
                self._pump(pod, container["name"])
            return
        containers = spec.get("containers") or []
        inits = spec.get("initContainers") or []
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
            # As the kubelet words it (convertToAPIContainerStatuses): PodInitializing, for
            # every container, while the pod has init containers to run.
            waiting = {"waiting": {"reason": "PodInitializing" if inits else
                                   "ContainerCreating"}}
            status.update(hostIP=NODE_IP, containerStatuses=[
                _container_status(c, waiting) for c in containers])
            if inits:
                status["initContainerStatuses"] = [_container_status(c, waiting) for c in inits]
                set_condition(conditions, "Initialized", "False", "ContainersNotInitialized",
                              "containers with incomplete status: "
                              f"[{' '.join(c['name'] for c in inits)}]")
            self._write_all(pod)
            self._event(pod, "Normal", "Scheduled", f"Successfully assigned {namespace}/{name} "
                        f"to {NODE_NAME}", "default-scheduler")
            return
        phase = status.get("phase")
        if phase == "Pending" and failure is Failure.IMAGE_PULL:
            first = all(s["state"].get("waiting", {}).get("reason") in (
                "ContainerCreating", "PodInitializing")
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
        elif phase == "Running":
            for container in inits:
                self._pump(pod, container["name"])
            if spec.get("restartPolicy") != "Always":
                self._run_to_completion(pod, behaviour)

    def _run_to_completion(self, pod: Obj, behaviour: Behaviour) -> None:
        """The main containers end once they have run `run_s`, writing `files`; then the
        sidecars are stopped; once those have ended too, the pod takes the phase its main
        containers decide."""
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        conditions = status["conditions"]
        mains = status["containerStatuses"]
        sidecars = [s for c, s in zip(spec.get("initContainers") or [],
                                      status.get("initContainerStatuses") or [], strict=False)
                    if is_native_sidecar(c)]
        if not all("terminated" in s["state"] for s in mains):
            if time.monotonic() - self._started.setdefault(meta["uid"], time.monotonic()) \
                    < behaviour.run_s:
                return
            # a RayJob's submitter ends with `ray job logs --follow`: 0 whatever the job did
            code = behaviour.exit_code if behaviour.failure in (
                Failure.FAIL, Failure.CRASH_LOOP) and all(
                o["kind"] != "RayJob" for o in self._lineage(pod)) else 0
            for container in spec.get("containers") or []:
                self.containers.write(pod, container, dict(behaviour.files))
            for s in mains:
                _terminate(s, code)
            for s in sidecars:  # the kubelet stops them once every main container has ended
                if "running" in s["state"]:
                    self.containers.stop(pod, s["name"])
                    self._event(pod, "Normal", "Killing", f"Stopping container {s['name']}")
            unready = "containers with unready status: " \
                      f"[{' '.join(s['name'] for s in mains + sidecars)}]"
            set_condition(conditions, "Ready", "False", "ContainersNotReady", unready)
            set_condition(conditions, "ContainersReady", "False", "ContainersNotReady", unready)
        for s in sidecars:
            if "running" not in s["state"]:
                continue
            code = self.containers.exit_code(pod, s["name"])
            if self.containers.running(pod, s["name"]) is None:
                code = 0  # played, not run: it stops as told
            if code is not None:
                _terminate(s, code)
        if all("terminated" in s["state"] for s in sidecars):
            ok = all(s["state"]["terminated"]["exitCode"] == 0 for s in mains)
            status["phase"] = "Succeeded" if ok else "Failed"
            set_condition(conditions, "Ready", "False", "PodCompleted")
            set_condition(conditions, "ContainersReady", "False", "PodCompleted")
        self._write_status(pod, status)

    def _pump(self, pod: Obj, container: str) -> None:
        """What a sidecar that runs printed since the last look, into its log."""
        if text := self.containers.pump(pod, container):
            self.store.append_log(pod["metadata"]["namespace"], pod["metadata"]["name"],
                                  container, text)

    def _start(self, pod: Obj, behaviour: Behaviour) -> None:
        meta, status, now = pod["metadata"], pod["status"], now_rfc3339()
        containers = pod["spec"].get("containers") or []
        if inits := pod["spec"].get("initContainers") or []:
            status["initContainerStatuses"] = [self._initialize(pod, c) for c in inits]
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

    def _initialize(self, pod: Obj, container: Obj) -> Obj:
        """An init container, as the kubelet leaves it before the main containers start: a
        regular one run to completion, a native sidecar started (and its script run, if it is
        one: its log is then what that prints). Returns its status."""
        meta, name, run = pod["metadata"], container["name"], new_container_id()
        self._event(pod, "Normal", "Pulled", f'Container image "{container.get("image")}" '
                    "already present on machine")
        self._event(pod, "Normal", "Created", f"Created container {name}")
        sidecar = is_native_sidecar(container)
        runs_for_real = sidecar and self.containers.start(pod, container)
        played = "" if runs_for_real else f"{name}: starting\n{name}: " + (
            "ready" if sidecar else "done")
        self.store.set_log(meta["namespace"], meta["name"], name, played, run)
        self._event(pod, "Normal", "Started", f"Started container {name}")
        if sidecar:  # no readiness probe: ready once started
            return _container_status(container, {"running": {"startedAt": now_rfc3339()}},
                                     True, run)
        status = _container_status(container, {"running": {"startedAt": now_rfc3339()}},
                                   False, run)
        _terminate(status, 0)
        return status

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


def _terminate(status: Obj, code: int) -> None:
    """A container status, as the container ended with exit code `code`."""
    status.update(ready=False, started=False, state={"terminated": {
        "exitCode": code, "reason": "Completed" if code == 0 else "Error",
        "startedAt": status["state"].get("running", {}).get("startedAt", now_rfc3339()),
        "finishedAt": now_rfc3339(), "containerID": status.get("containerID", "")}})


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
