"""The Kubernetes provider against an emulated API server on loopback, through the official
client (create, readiness, pipelines, the service proxy, artifacts, destroy, the janitor), and
its pure rules (readiness, diagnosis, names) by tables.

The emulator wants a bearer token on every request, the service proxy's included, as EKS, GKE
and in-cluster service accounts do: the kubeconfigs here hold a token (or an exec plugin that
hands one out), so a session that reaches services without the client's credentials gets 401."""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests
from kubernetes import client as k8s
from kubernetes.config.incluster_config import InClusterConfigLoader

from mlci_dagster.definitions import build_definitions
from mlci_dagster.history.analysis import PartitionStatus, analyze
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.providers.base import Provider, build_provider
from mlci_dagster.providers.handle import SandboxError, SandboxHandle, render_context
from mlci_dagster.providers.janitor import registry_providers, sweep
from mlci_dagster.providers.kubernetes import KubernetesProvider, diagnose
from mlci_dagster.providers.kubernetes.client import RetryPolicy, session_for
from mlci_dagster.providers.kubernetes.manifests import ManifestError, load_manifest
from mlci_dagster.providers.kubernetes.pipelines import last_traceback, log_tail
from mlci_dagster.providers.kubernetes.provider import (
    HANDLE_ANNOTATION,
    label_value,
    namespace_name,
)
from mlci_dagster.registry import load_registry
from mlci_dagster.registry.kubernetes import (
    ClusterSpec,
    K8sJobPipeline,
    K8sResourcePipeline,
    KubernetesSandbox,
)
from mlci_dagster.registry.models import DEFAULT_TIMEOUTS_S, HistorySettings, RouteCheck
from mlci_dagster.sensors.cleanup import sandbox_janitor
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.lifecycle import run_lifecycle
from mlci_dagster.stages.results import build_record
from mlci_dagster.stages.ui_smoke import check_route
from mlci_dagster.vocabulary import FailureKind, Stage
from tests.support.kube_controller import TRACEBACK, KubeController
from tests.support.kube_store import TYPES, ManualClock, wait_until
from tests.support.kube_wire import KubeApiServer, echo_backend, write_exec_plugin
from tests.support.registries import config, write_registry

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
PRODUCT, INFRA, TIMEOUT = FailureKind.PRODUCT, FailureKind.INFRA, FailureKind.TIMEOUT


def cond(kind: str, status: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def obj(*conditions: dict, **status) -> dict:
    return {"metadata": {"name": "x"}, "status": {"conditions": list(conditions), **status}}


def pod(name: str = "web-1", phase: str = "Running", containers: list[dict] | None = None,
        conditions: list[dict] | None = None) -> dict:
    return {"metadata": {"name": name},
            "status": {"phase": phase, "containerStatuses": containers or [],
                       "conditions": conditions or []}}


def waiting(reason: str, restarts: int = 0, last_exit: int | None = None) -> dict:
    status = {"name": "app", "ready": False, "restartCount": restarts,
              "state": {"waiting": {"reason": reason, "message": f"{reason} details"}}}
    if last_exit is not None:
        status["lastState"] = {"terminated": {"exitCode": last_exit, "reason": "Error"}}
    return status


def event(reason: str, message: str, kind: str = "Warning", name: str = "web-1",
          at: str = "2026-01-01T00:00:00Z") -> dict:
    return {"type": kind, "reason": reason, "message": message, "lastTimestamp": at,
            "involvedObject": {"kind": "Pod", "name": name}}


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, engine", [
    ("train", "e1"),
    ("a" * 63, "e1"),
    ("x" * 40 + "-" + "y" * 22, "engine-with-a-very-long-name-indeed"),
    ("ends-with-dash-at-the-cut-" * 3, "ray"),
])
def test_namespace_name_is_a_dns_label_that_keeps_engine_and_suffix(config, engine):
    name = namespace_name(config, engine, "0a1b2c3d")
    assert DNS_LABEL.match(name) and len(name) <= 63
    assert name.endswith("-0a1b2c3d") and engine[:20].strip("-") in name
    assert name.startswith(config[:10])


@pytest.mark.parametrize("text", ["train.e1", "run-0f3c", "a" * 63 + ".e1", "weird/value:x",
                                  "-dashes-"])
def test_label_value_is_valid_and_long_values_stay_distinct(text):
    value = label_value(text)
    assert LABEL_VALUE.match(value) and len(value) <= 63
    if len(text) <= 63 and re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", text):
        assert value == text
    assert label_value("a" * 70 + ".e1") != label_value("a" * 70 + ".e2")


@pytest.mark.parametrize("logs, expected", [
    ("no trouble here\n", ""),
    (f"start\n{TRACEBACK}\n", TRACEBACK),
    (f"start\n{TRACEBACK}\nERR cli.py:71 -- Job 'x' failed\n---\n", TRACEBACK),
    (f"Traceback (most recent call last):\n  File 'a'\nValueError\nlater\n{TRACEBACK}",
     TRACEBACK),
])
def test_last_traceback(logs, expected):
    assert last_traceback(logs) == expected


def test_log_tail_repeats_a_traceback_that_is_not_at_the_end():
    logs = f"{TRACEBACK}\n" + "submitter: line\n" * 200
    tail = log_tail(logs, 300)
    assert tail.endswith(f"the last traceback in the logs:\n{TRACEBACK}")
    assert log_tail(f"x\n{TRACEBACK}\n", 300) == f"x\n{TRACEBACK}\n"


def test_load_manifest_reads_every_document_and_expands_lists(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text("kind: A\n---\n---\nkind: List\nitems:\n- kind: B\n- kind: C\n")
    assert [d["kind"] for d in load_manifest(path)] == ["A", "B", "C"]
    path.write_text("- not\n- a mapping\n")
    with pytest.raises(ManifestError, match="document 1: expected a mapping"):
        load_manifest(path)


# --- readiness --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, found, wanted, ready, failed, why", [
    ("Deployment", obj(cond("Available", "True", "MinimumReplicasAvailable")), None, True,
     None, "Available=True"),
    ("Deployment", obj(cond("Available", "False", "MinimumReplicasUnavailable")), None, False,
     None, "0/1 replicas available"),
    ("Deployment", obj(cond("Progressing", "False", "ProgressDeadlineExceeded",
                            "ReplicaSet web-1 has timed out progressing.")), None, False,
     TIMEOUT, "ProgressDeadlineExceeded"),
    ("Job", obj(cond("Complete", "True")), None, True, None, "Complete=True"),
    ("Job", obj(cond("Failed", "True", "BackoffLimitExceeded")), None, False, PRODUCT,
     "BackoffLimitExceeded"),
    ("Job", obj(), None, False, None, "no Complete condition yet"),
    ("Pod", obj(cond("Ready", "True"), phase="Running"), None, True, None, "Ready=True"),
    ("Pod", obj(phase="Failed"), None, False, PRODUCT, "pod ended Failed"),
    ("Pod", obj(cond("Ready", "False"), phase="Pending"), None, False, None, "phase Pending"),
    ("StatefulSet", {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}}, None, True, None,
     "2/2"),
    ("StatefulSet", {"spec": {"replicas": 2}, "status": {}}, None, False, None, "0/2"),
    ("RayCluster", obj(cond("Ready", "True")), None, True, None, "Ready=True"),
    ("Notebook", obj(cond("Serving", "True")), "Serving", True, None, "Serving=True"),
    ("Notebook", obj(cond("Serving", "False", "Starting")), "Serving", False, None, "Starting"),
    ("Deployment", None, None, False, None, "not found"),
])
def test_readiness_by_kind(kind, found, wanted, ready, failed, why):
    state = diagnose.readiness(kind, found, wanted)
    assert (state.ready, state.failed) == (ready, failed)
    assert why in state.why


@pytest.mark.parametrize("kind, found, selector", [
    ("Deployment", {"spec": {"selector": {"matchLabels": {"app": "web", "tier": "a"}}}},
     "app=web,tier=a"),
    ("Job", {"spec": {}}, "job-name=train"),
    ("Job", {"spec": {"selector": {"matchLabels": {"controller-uid": "u1"}}}},
     "controller-uid=u1"),
    ("RayJob", {"spec": {}}, None),
])
def test_pod_selector_of_an_object(kind, found, selector):
    assert diagnose.pod_selector(kind, found, "train") == selector


SERVICE = {"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [
    {"name": "http", "port": 8080, "targetPort": "http"}]}}


def backend_pod(ready: bool = True, port_name: str = "http", **metadata: Any) -> dict:
    return {"metadata": {"name": "web-1", **metadata},
            "spec": {"containers": [{"name": "app", "ports": [
                {"name": port_name, "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "10.244.0.7",
                       "conditions": [cond("Ready", "True" if ready else "False")]}}


@pytest.mark.parametrize("service, pods, port, ready, failed, why", [
    (SERVICE, [backend_pod()], 8080, True, None, "1/1 pods (app=web) ready behind it"),
    (SERVICE, [backend_pod()], "http", True, None, "1/1 pods"),
    (SERVICE, [backend_pod(), backend_pod(ready=False)], 8080, True, None, "1/2 pods"),
    (SERVICE, [backend_pod(ready=False)], 8080, False, None, "0/1 pods (app=web) ready"),
    (SERVICE, [backend_pod(deletionTimestamp="2026-01-01T00:00:00Z")], 8080, False, None,
     "0/1 pods"),
    (SERVICE, [backend_pod(port_name="grpc")], 8080, False, None, "0/1 pods"),  # no `http`
    (SERVICE, [], 8080, False, None, "no pods match its selector app=web"),
    (SERVICE, [backend_pod()], 9090, False, FailureKind.CONFIG,
     "the Service has no port 9090 (its ports: http)"),
    ({"metadata": {"name": "ext"}, "spec": {"ports": [{"port": 80}]}}, [], 80, True, None,
     "no selector"),
    (None, [], 8080, False, None, "not found"),
])
def test_service_readiness_is_a_ready_pod_behind_the_port(service, pods, port, ready, failed,
                                                          why):
    state = diagnose.service_readiness(service, pods, port)
    assert (state.ready, state.failed) == (ready, failed)
    assert why in state.why


# --- diagnosis --------------------------------------------------------------------------------

CRASHING = pod(containers=[waiting("CrashLoopBackOff", restarts=4, last_exit=1)])
PULLING = pod(phase="Pending", containers=[waiting("ImagePullBackOff")])
UNSCHEDULABLE = pod(phase="Pending", conditions=[cond(
    "PodScheduled", "False", "Unschedulable", "0/1 nodes are available: 1 Insufficient cpu.")])
STARTING = pod(phase="Pending", containers=[waiting("ContainerCreating")])


@pytest.mark.parametrize("states, pods, events, kind", [
    ([], [CRASHING], [], PRODUCT),
    ([], [PULLING], [], INFRA),
    ([], [UNSCHEDULABLE], [], INFRA),
    ([], [STARTING], [], TIMEOUT),
    ([], [], [event("FailedScheduling", "0/3 nodes are available")], INFRA),
    ([], [], [event("BackOff", "Back-off restarting failed container app")], PRODUCT),
    ([], [], [event("BackOff", "Back-off pulling image \"nope:1\"")], INFRA),
    ([], [], [event("Scheduled", "assigned", kind="Normal")], TIMEOUT),
    ([diagnose.Readiness(False, "Failed=True", PRODUCT)], [], [], PRODUCT),
    ([diagnose.Readiness(False, "ProgressDeadlineExceeded", TIMEOUT)], [], [], TIMEOUT),
    ([diagnose.Readiness(False, "ProgressDeadlineExceeded", TIMEOUT)], [PULLING], [], INFRA),
    # A crash is the product's verdict even while another pod waits for the cluster.
    ([], [UNSCHEDULABLE, CRASHING], [], PRODUCT),
    ([], [pod(containers=[{"name": "app", "state": {"terminated": {"exitCode": 2}}}])], [],
     PRODUCT),
])
def test_failure_kind(states, pods, events, kind):
    assert diagnose.failure_kind(states, pods, events) is kind


def test_crashed_containers_are_the_ones_whose_logs_say_why():
    assert diagnose.crashed_containers(CRASHING) == ["app"]
    assert diagnose.crashed_containers(PULLING) == []
    assert diagnose.crashed_containers(UNSCHEDULABLE) == []


def test_describe_pod_names_container_states_restarts_and_last_exit():
    text = diagnose.describe_pod(CRASHING)
    assert "pod web-1 (Running)" in text
    assert "container app: waiting CrashLoopBackOff" in text
    assert "restarts 4" in text and "last exit 1 (Error)" in text
    assert "not scheduled: PodScheduled=False (Unschedulable): 0/1 nodes" in \
        diagnose.describe_pod(UNSCHEDULABLE)


def test_not_ready_report_leads_with_the_gist_and_ends_with_the_warnings():
    events = [event("Scheduled", "ok", kind="Normal", at=f"2026-01-01T00:00:0{i}Z")
              for i in range(5)]
    events.append(event("BackOff", "Back-off restarting failed container app",
                        at="2026-01-01T00:00:00Z"))
    report = diagnose.not_ready_report(
        "ns1", [("Deployment web", diagnose.Readiness(False, "Available=False"), [CRASHING]),
                ("Job init", diagnose.Readiness(False, "not found"), [])], events, 3.04)
    lines = report.splitlines()
    assert lines[0] == ("Deployment web, Job init not ready in namespace ns1 after 3.0s: "
                        "pod web-1 container app: CrashLoopBackOff")
    assert lines[1] == "Deployment web: Available=False"
    assert "waiting CrashLoopBackOff" in report and "Job init: not found" in lines
    # Warnings only, when there are any (normal events would be noise), last: a summary that
    # keeps the head and the tail keeps them.
    assert lines[-2:] == ["recent warnings in namespace ns1:",
                          "  Warning BackOff pod/web-1: Back-off restarting failed container app"]


def test_recent_events_are_the_normal_ones_when_nothing_warned():
    events = [event("Scheduled", f"ok {i}", kind="Normal", at=f"2026-01-01T00:00:0{i}Z")
              for i in range(5)]
    assert [e["message"] for e in diagnose.recent_events(events, 2)] == ["ok 3", "ok 4"]
    report = diagnose.not_ready_report("ns1", [], events, 1)
    assert "recent events in namespace ns1:" in report


@pytest.mark.parametrize("namespace, expected", [
    ({"metadata": {"name": "n"}, "spec": {"finalizers": ["kubernetes"]},
      "status": {"phase": "Terminating", "conditions": [
          cond("NamespaceFinalizersRemaining", "True", "SomeFinalizersRemain",
               "Some content in the namespace has finalizers remaining: example.com/hold in 1 "
               "resource instances"),
          cond("NamespaceDeletionDiscoveryFailure", "False")]}},
     ["namespace n is Terminating", "finalizers: kubernetes",
      "NamespaceFinalizersRemaining: Some content", "example.com/hold"]),
    ({"metadata": {"name": "n"}, "status": {"phase": "Active"}}, ["namespace n is Active"]),
])
def test_namespace_blockers(namespace, expected):
    text = diagnose.namespace_blockers(namespace)
    assert all(part in text for part in expected), text
    assert "DiscoveryFailure" not in text


# --- against the emulated API server -----------------------------------------------------------

SECRET = "s3cr3t-k8s-token-9f2b"
SECRET_ENV = "MLCI_TEST_K8S_TOKEN"
IMAGE = {"ref": "example.test/app@sha256:abc123", "digest": "sha256:abc123"}
ENGINE_VARIABLES = {"STORE": "${sandbox.id}-store", "DB_PASSWORD": "${env.MLCI_TEST_K8S_TOKEN}"}

DB = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: postgres, image: postgres:16}]}
"""
APP = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data:
  sandbox: ${sandbox.id}
  image: ${image.ref}
  store: ${vars.STORE}
  url: ${services.web.url}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: ${image.ref}
        env:
        - name: API_TOKEN
          valueFrom: {secretKeyRef: {name: creds, key: API_TOKEN}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 8080}]
"""
TRAIN_JOB = """
apiVersion: batch/v1
kind: Job
metadata: {name: train}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: train, image: "${image.ref}", args: ["--store", "${vars.STORE}"]}]
"""
RAY_JOB = """
apiVersion: ray.io/v1
kind: RayJob
metadata: {name: rayjob}
spec:
  entrypoint: python /app/train.py
  rayClusterSpec:
    headGroupSpec:
      template:
        spec: {containers: [{name: ray-head, image: "rayproject/ray:2.9.0"}]}
"""


@pytest.fixture
def registry(tmp_path: Path, kube) -> Path:
    root = tmp_path / "registry"
    (root / "k8s").mkdir(parents=True)
    for name, text in {"db.yaml": DB, "app.yaml": APP, "train.yaml": TRAIN_JOB,
                       "rayjob.yaml": RAY_JOB}.items():
        (root / "k8s" / name).write_text(text)
    kube[0].kubeconfig(root / "kubeconfig.json")
    return root


@pytest.fixture
def provider(tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
             ) -> KubernetesProvider:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return KubernetesProvider(tmp_path / "home", [SECRET_ENV], root=registry,
                              settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                              poll_interval_s=0.05)


def sandbox(**overrides: Any) -> KubernetesSandbox:
    body = {"provider": "kubernetes", "ttl_s": 600,
            "cluster": {"kubeconfig": "kubeconfig.json"},
            "manifests": ["k8s/db.yaml", "k8s/app.yaml"],  # the engine's first, as staged
            "secrets": [{"name": "creds", "data": {"API_TOKEN": f"${{env.{SECRET_ENV}}}"}}],
            "services": [{"name": "web", "service": "web", "port": 8080}]}
    return KubernetesSandbox.model_validate({**body, **overrides})


def create(provider: KubernetesProvider, spec: KubernetesSandbox | None = None,
           config: str = "train", run_id: str = "run-1") -> SandboxHandle:
    return provider.create(spec or sandbox(), config=config, engine="e1", run_id=run_id,
                           engine_variables=ENGINE_VARIABLES, teardown_s=60,
                           image=IMAGE)


def context_of(handle: SandboxHandle) -> dict[str, Any]:
    return render_context(handle, {}, image=IMAGE, outputs={})


def files_under(path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in path.rglob("*") if p.is_file())


def test_create_makes_a_labelled_namespace_holding_its_handle_and_the_templated_manifests(
        provider, kube, tmp_path):
    server, _ = kube
    handle = create(provider)
    ns = handle.sandbox_id
    namespace = next(o for o in server.objects("Namespace") if o["metadata"]["name"] == ns)
    labels = namespace["metadata"]["labels"]
    assert ns.startswith("train-e1-") and len(ns) <= 63
    assert labels["app.kubernetes.io/managed-by"] == "mlci"
    assert labels["mlci.dev/run-id"] == "run-1"
    assert labels["mlci.dev/partition"] == "train.e1"
    assert int(labels["mlci.dev/expires-at"]) == int(handle.expires_at)
    annotated = json.loads(namespace["metadata"]["annotations"][HANDLE_ANNOTATION])
    assert annotated == handle.to_dict()
    # Secrets first, then the manifests in order: the engine's, then the config's.
    created = [path.split("/")[-1] for method, path in server.requests
               if method == "POST" and f"/namespaces/{ns}/" in path]
    assert created == ["secrets", "statefulsets", "configmaps", "deployments", "services"]
    settings = server.objects("ConfigMap", ns)[0]["data"]
    assert settings == {"sandbox": ns, "image": IMAGE["ref"], "store": f"{ns}-store",
                        "url": handle.endpoints["web"]}
    assert handle.endpoints["web"] == (f"{server.url}/api/v1/namespaces/{ns}/services/"
                                       "http:web:8080/proxy")
    assert handle.state["access"]["kubeconfig"] == str(provider.root / "kubeconfig.json")
    assert handle.owner_pid and handle.owner_start
    assert [h.sandbox_id for h in provider.ledger.live("kubernetes")] == [ns]
    # The secret reached the cluster, and nothing the harness keeps.
    secret = server.objects("Secret", ns)[0]
    assert SECRET in json.dumps(secret) or base64.b64encode(SECRET.encode()).decode() in \
        json.dumps(secret)
    assert handle.variables["DB_PASSWORD"] == f"${{env.{SECRET_ENV}}}"
    assert SECRET not in json.dumps(handle.to_dict()) + json.dumps(namespace)
    assert SECRET not in files_under(tmp_path / "home")


def test_ready_when_every_deployment_and_statefulset_is_and_every_service_has_a_ready_pod(
        provider):
    handle = create(provider)
    probes = provider.wait_until_ready(handle, sandbox(), timeout_s=10)
    assert sorted(p["object"] for p in probes) == [
        "Deployment web", "Service web port 8080", "StatefulSet db"]
    assert all(p["ready"] for p in probes)
    service = next(p for p in probes if p["object"].startswith("Service"))
    assert service["why"] == "1/1 pods (app=web) ready behind it"
    assert provider.destroy(handle, timeout_s=60).clean


def test_explicit_ready_checks_by_name_selector_and_condition(provider):
    spec = sandbox(ready=[{"kind": "Pod", "selector": "app=web"},
                          {"kind": "Deployment", "name": "web", "condition": "Progressing"}])
    handle = create(provider, spec)
    probes = provider.wait_until_ready(handle, spec, timeout_s=10)
    assert sorted(p["object"] for p in probes) == [
        "Deployment web", "Pods (app=web)", "Service web port 8080"]
    assert all(p["ready"] for p in probes)


BARE_POD = """
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers: [{name: app, image: "${image.ref}", ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: http}]
"""


def test_readiness_waits_for_a_ready_pod_behind_each_service_the_stages_reach(
        provider, kube, registry, backend):
    """A bare Pod is no default readiness check: before the Service's own check, a sandbox of
    a Pod and a Service was "ready" at once, and its UI smoke met the proxy's 503."""
    server, controller = kube
    (registry / "k8s" / "pod.yaml").write_text(BARE_POD)
    controller.behave("Pod", "web", failure="unschedulable")
    spec = sandbox(manifests=["k8s/pod.yaml"], secrets=[])
    handle = create(provider, spec)
    server.route_service(None, "web", backend)

    with pytest.raises(SandboxError) as failed:
        provider.wait_until_ready(handle, spec, timeout_s=1)

    message = str(failed.value)
    assert failed.value.kind == "infra", message  # it cannot be scheduled
    assert message.startswith(f"Service web port 8080 not ready in namespace {handle.sandbox_id}")
    assert "Service web port 8080: 0/1 pods (app=web) ready behind it" in message
    assert "pod web unschedulable: 0/1 nodes are available" in message


def test_a_service_port_the_service_does_not_declare_fails_readiness_as_config_at_once(
        provider, kube):
    spec = sandbox(services=[{"name": "web", "service": "web", "port": 9090}])
    handle = create(provider, spec)
    started = time.monotonic()

    with pytest.raises(SandboxError) as failed:
        provider.wait_until_ready(handle, spec, timeout_s=30)

    assert failed.value.kind == "config"
    assert "Service web port 9090: the Service has no port 9090 (its ports: 8080)" in str(
        failed.value)
    assert time.monotonic() - started < 10  # not the 30 s of the timeout


def test_a_ui_route_hit_before_its_pods_are_ready_fails_naming_the_proxys_answer(
        provider, kube, backend):
    """The API server's proxy answers 503 `no endpoints available` until a ready pod backs the
    port (the emulator used to forward whatever the pods' state, and this route passed)."""
    server, controller = kube
    controller.behave("Deployment", "web", failure="unschedulable")
    handle = create(provider)
    server.route_service(None, "web", backend)
    route = RouteCheck.model_validate({"service": "web", "path": "/health"})

    check = check_route(route, handle.endpoints["web"], {}, provider.http(handle))

    assert check.status is None
    [problem] = check.problems
    assert problem.startswith(f"GET {handle.endpoints['web']}/health: ServiceProxyRefusal: "
                              "the API server's service proxy answered 503 ServiceUnavailable "
                              f"for service http:web:8080 in namespace {handle.sandbox_id}: "
                              'no endpoints available for service "web" (no ready pod backs '
                              "this port of the Service")


def crash_looping(server: KubeApiServer, ns: str) -> bool:
    pods = server.objects("Pod", ns)
    deployment = server.objects("Deployment", ns)[0]
    return any("CrashLoopBackOff" in json.dumps(p["status"]) for p in pods) and \
        diagnose.condition(deployment, "Available")["status"] == "False"


def test_a_crash_looping_deployment_is_a_product_failure_naming_its_pod_and_events(
        provider, kube):
    server, controller = kube
    controller.behave("Deployment", "web", failure="crash-loop")
    handle = create(provider)
    # A container without a readiness probe is Ready until it first crashes, as on a real
    # cluster: the verdict is asked of a deployment already crash-looping.
    wait_until(lambda: crash_looping(server, handle.sandbox_id), what="a crash loop")
    with pytest.raises(SandboxError) as failed:
        provider.wait_until_ready(handle, sandbox(), timeout_s=0.5)
    pod = next(p["metadata"]["name"] for p in server.objects("Pod", handle.sandbox_id)
               if p["metadata"]["name"].startswith("web-"))
    message = str(failed.value)
    assert failed.value.kind == "product"
    assert re.match(rf"Deployment web not ready in namespace {handle.sandbox_id} after "
                    rf"[\d.]+s: pod {pod} container app: CrashLoopBackOff", message), message
    # (its Service waits on the same pod: named below, not in the first line)
    assert "\nService web port 8080: 0/1 pods (app=web) ready behind it\n" in message
    assert "Deployment web: Available=False" in message
    assert f"pod {pod}" in message and "waiting CrashLoopBackOff" in message
    assert f"Warning BackOff pod/{pod}: Back-off restarting failed container app" in message
    # Its last words end the message, where a summary keeping the tail finds them.
    assert f"last lines of pod {pod} container app:\n{TRACEBACK}\nrecent warnings" in message
    assert message.splitlines()[-1].startswith(f"  Warning BackOff pod/{pod}: Back-off")
    assert Path(failed.value.log_ref).read_text() == message
    assert provider.destroy(handle, timeout_s=60).clean


@pytest.mark.parametrize("failure, kind, evidence", [
    ("unschedulable", "infra", "FailedScheduling"),
    ("image-pull", "infra", "ImagePullBackOff"),
    ("progress-deadline", "timeout", "ProgressDeadlineExceeded"),
])
def test_a_deployment_that_cannot_start_says_why(provider, kube, failure, kind, evidence):
    _, controller = kube
    controller.behave("Deployment", "web", failure=failure)
    handle = create(provider)
    started = time.monotonic()
    with pytest.raises(SandboxError) as failed:
        provider.wait_until_ready(handle, sandbox(), timeout_s=1.5)
    assert failed.value.kind == kind, str(failed.value)
    assert evidence in str(failed.value) and "Deployment web" in str(failed.value)
    assert time.monotonic() - started < 5
    assert provider.destroy(handle, timeout_s=60).clean


def test_a_failed_create_deletes_what_it_made_and_names_the_document(provider, kube, registry):
    server, _ = kube
    (registry / "k8s" / "widget.yaml").write_text(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    with pytest.raises(SandboxError) as failed:
        create(provider, sandbox(manifests=["k8s/db.yaml", "k8s/widget.yaml"]))
    assert failed.value.kind == "infra"
    assert "k8s/widget.yaml#1" in str(failed.value) and "Widget" in str(failed.value)
    assert [n for n in server.namespaces() if n.startswith("train-")] == []
    assert provider.ledger.live() == []


def test_a_missing_secret_variable_fails_create_naming_it(provider, kube, monkeypatch):
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(SandboxError, match=f"environment variable {SECRET_ENV} is not set"):
        create(provider)
    assert [n for n in kube[0].namespaces() if n.startswith("train-")] == []


def test_a_manifest_naming_an_unset_variable_fails_create_naming_only_it(provider, kube,
                                                                        registry):
    (registry / "k8s" / "env.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
        "data: {token: '${env.MLCI_TEST_UNSET_VARIABLE}'}\n")
    with pytest.raises(SandboxError) as failed:
        create(provider, sandbox(manifests=["k8s/env.yaml"]))
    assert str(failed.value).endswith("k8s/env.yaml: document 1: environment variable "
                                      "MLCI_TEST_UNSET_VARIABLE is not set")


def test_cluster_scoped_objects_go_with_their_sandbox_and_are_never_shared(provider, kube,
                                                                           registry):
    server, _ = kube
    (registry / "k8s" / "shared.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: 'shared-${config}'}\n")
    spec = sandbox(manifests=["k8s/shared.yaml"], secrets=[], services=[])
    first = create(provider, spec)
    assert first.state["objects"][0] | {"source": ""} == {
        "apiVersion": "v1", "kind": "Namespace", "name": "shared-train", "namespaced": False,
        "source": ""}
    with pytest.raises(SandboxError) as clash:
        create(provider, spec)
    assert "k8s/shared.yaml#1: create Namespace shared-train (cluster-scoped): 409" in \
        str(clash.value)
    assert "name it per sandbox, with ${sandbox.id}" in str(clash.value)
    assert "shared-train" in server.namespaces()  # the clash deleted only its own
    assert provider.destroy(first, timeout_s=10).clean
    assert [n for n in server.namespaces() if n.startswith(("train-", "shared-"))] == []


def job_pipeline(**overrides: Any) -> K8sJobPipeline:
    return K8sJobPipeline.model_validate({"kind": "k8s_job", "name": "train",
                                          "manifest": "k8s/train.yaml", **overrides})


def test_k8s_job_passes_with_outputs_captured_from_its_logs(provider, kube):
    server, controller = kube
    controller.behave("Job", "train", log="epoch 1\nrun_id=42\naccuracy: 0.93\n")
    handle = create(provider)
    result = provider.run_pipeline(
        handle, job_pipeline(expect_output=["accuracy"],
                             outputs={"RUN_ID": r"run_id=(\d+)", "ACC": r"accuracy: ([\d.]+)"}),
        context_of(handle), timeout_s=10)
    assert result.passed, result.summary
    assert result.outputs == {"RUN_ID": "42", "ACC": "0.93"}
    log = Path(result.log_ref).read_text()
    assert result.log_ref.endswith("pipeline-train.log") and "run_id=42" in log
    job = server.objects("Job", handle.sandbox_id)[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "--store", f"{handle.sandbox_id}-store"]
    assert provider.destroy(handle, timeout_s=60).clean


def test_k8s_job_that_fails_is_a_product_failure_with_its_log_tail(provider, kube):
    _, controller = kube
    controller.behave("Job", "train", failure="fail", log=f"loading\n{TRACEBACK}\n")
    handle = create(provider)
    result = provider.run_pipeline(handle, job_pipeline(), context_of(handle), timeout_s=10)
    assert not result.passed and result.failure_kind is FailureKind.PRODUCT
    assert result.summary.startswith("Job train failed: Failed=True (BackoffLimitExceeded)")
    assert "RuntimeError: training diverged: loss is nan" in result.summary
    assert "terminated exit 1 (Error)" in result.summary
    assert "RuntimeError" in Path(result.log_ref).read_text()


def test_k8s_job_whose_output_lacks_an_expectation_fails(provider, kube):
    handle = create(provider)
    result = provider.run_pipeline(handle, job_pipeline(outputs={"RUN_ID": r"run_id=(\d+)"}),
                                   context_of(handle), timeout_s=10)
    assert not result.passed and result.failure_kind is FailureKind.PRODUCT
    assert "output 'RUN_ID' not found" in result.summary


def test_k8s_job_at_its_timeout_is_deleted(provider, kube):
    server, controller = kube
    controller.behave("Job", "train", run_s=60)
    handle = create(provider)
    result = provider.run_pipeline(handle, job_pipeline(), context_of(handle), timeout_s=0.5)
    assert not result.passed and result.failure_kind is FailureKind.TIMEOUT
    assert "not finished at the timeout of 0.5s" in result.summary
    assert "Job train deleted" in result.summary
    assert server.objects("Job", handle.sandbox_id) == []
    wait_until(lambda: not [p for p in server.objects("Pod", handle.sandbox_id)
                            if p["metadata"]["name"].startswith("train-")], what="pods gone")


def resource_pipeline(**overrides: Any) -> K8sResourcePipeline:
    return K8sResourcePipeline.model_validate({
        "kind": "k8s_resource", "name": "ray", "manifest": "k8s/rayjob.yaml",
        "status_field": "status.jobStatus", "success_states": ["SUCCEEDED"],
        "failure_states": ["FAILED"], "interval_s": 0.05, **overrides})


def test_k8s_resource_rayjob_succeeds_with_outputs_from_its_status(provider):
    handle = create(provider)
    result = provider.run_pipeline(
        handle, resource_pipeline(outputs={"JOB_ID": "status.jobId",
                                           "DEPLOYMENT": "status.jobDeploymentStatus"}),
        context_of(handle), timeout_s=10)
    assert result.passed, result.summary
    assert result.outputs["DEPLOYMENT"] == "Complete"
    assert result.outputs["JOB_ID"].startswith("rayjob-")
    log = Path(result.log_ref).read_text()
    assert "status.jobStatus = SUCCEEDED" in log and "training finished" in log


def test_k8s_resource_rayjob_failed_quotes_the_driver_traceback(provider, kube):
    _, controller = kube
    controller.behave("RayJob", "rayjob", failure="fail")
    handle = create(provider)
    result = provider.run_pipeline(handle, resource_pipeline(), context_of(handle),
                                   timeout_s=10)
    assert not result.passed and result.failure_kind is FailureKind.PRODUCT
    assert result.summary.startswith("RayJob rayjob ended status.jobStatus = FAILED")
    assert "reason: AppFailed" in result.summary
    assert "logs of pods job-name=rayjob" in result.summary
    # The submitter prints its own lines after the driver's: the traceback is repeated last.
    assert result.summary.endswith(f"the last traceback in the logs:\n{TRACEBACK}")


def test_k8s_resource_at_its_timeout_is_deleted(provider, kube):
    server, controller = kube
    controller.behave("Job", "rayjob", run_s=60)  # the submitter runs on and on
    handle = create(provider)
    result = provider.run_pipeline(handle, resource_pipeline(), context_of(handle),
                                   timeout_s=0.6)
    assert not result.passed and result.failure_kind is FailureKind.TIMEOUT
    assert "RayJob rayjob still status.jobStatus =" in result.summary
    assert "RayJob rayjob deleted" in result.summary
    assert server.objects("RayJob", handle.sandbox_id) == []


SPARK_APP = """
apiVersion: sparkoperator.k8s.io/v1beta2
kind: SparkApplication
metadata: {name: features}
spec:
  type: Python
  image: "${image.ref}"
  mainApplicationFile: local:///app/features.py
  sparkVersion: "3.5.1"
"""


@pytest.mark.parametrize("fails", [False, True])
def test_k8s_resource_spark_application_ends_on_its_terminal_state(provider, kube, registry,
                                                                   fails):
    _, controller = kube
    (registry / "k8s" / "spark.yaml").write_text(SPARK_APP)
    if fails:
        controller.behave("SparkApplication", "features", failure="fail",
                          log="column customer_id not found")
    handle = create(provider)
    # No failure state listed: FAILED still ends the wait, being the kind's terminal state.
    pipeline = resource_pipeline(name="features", manifest="k8s/spark.yaml",
                                 status_field="status.applicationState.state",
                                 success_states=["COMPLETED"], failure_states=[],
                                 outputs={"APP_ID": "status.sparkApplicationId"})
    result = provider.run_pipeline(handle, pipeline, context_of(handle), timeout_s=10)
    log = Path(result.log_ref).read_text()
    assert "--- pod features-driver container spark-kubernetes-driver" in log
    if not fails:
        assert result.passed, result.summary
        assert result.outputs["APP_ID"].startswith("spark-")
        assert "Pi is roughly 3.14" in log
        return
    assert not result.passed and result.failure_kind is FailureKind.PRODUCT
    assert result.summary.startswith(
        "SparkApplication features ended status.applicationState.state = FAILED")
    assert "errorMessage: driver container failed with ExitCode: 1" in result.summary
    assert "SparkException: column customer_id not found" in result.summary
    assert result.duration_s < 5


@pytest.fixture
def backend() -> Iterator[str]:
    with echo_backend() as url:
        yield url


def test_a_service_is_reached_through_the_api_servers_proxy(provider, kube, backend):
    server, _ = kube
    handle = create(provider)
    provider.wait_until_ready(handle, sandbox(), timeout_s=10)
    server.route_service(handle.sandbox_id, "web", backend)
    response = provider.http(handle).get(handle.endpoints["web"] + "/v1/models?x=1", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"path": "/v1/models?x=1", "ok": True}
    assert ("GET", f"/api/v1/namespaces/{handle.sandbox_id}/services/http:web:8080/proxy/"
                   "v1/models") in server.requests


def test_a_client_certificate_over_tls_reaches_the_cluster_and_its_services(
        tmp_path, registry, backend, monkeypatch):
    """A kubeconfig with a client certificate (as kind's and k3d's are) against an HTTPS API
    server whose CA it trusts: the API calls and the service proxy's requests both present the
    certificate and verify the server. RBAC on, the certificate's O is system:masters.

    The environment names a CA bundle of public CAs and a proxy the API server is exempt from,
    as many machines' do: the session must keep to the cluster's CA and to NO_PROXY as the
    client does (requests alone would verify against REQUESTS_CA_BUNDLE and fail)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens: must be unused
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with KubeApiServer(rbac=True, tls=True) as server, \
            KubeController(server, interval_s=0.05):
        server.kubeconfig(registry / "kubeconfig.json",
                          client_certificate=("kind-admin", ["system:masters"]))
        provider = KubernetesProvider(tmp_path / "tls-home", [SECRET_ENV], root=registry,
                                      settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                                      poll_interval_s=0.05)
        handle = create(provider)
        provider.wait_until_ready(handle, sandbox(), timeout_s=10)
        server.route_service(handle.sandbox_id, "web", backend)

        response = provider.http(handle).get(handle.endpoints["web"] + "/ping", timeout=5)
        report = provider.destroy(handle, timeout_s=30)

        assert handle.endpoints["web"].startswith(server.url + "/api/v1/")
        assert server.url.startswith("https://")
        assert response.status_code == 200, response.text
        assert response.json() == {"path": "/ping", "ok": True}
        assert report.clean, report
        users = {user for user, _, _ in server.request_log}
        assert users == {"kind-admin"}, users
        with pytest.raises(requests.exceptions.SSLError):  # the server's CA is its own
            requests.get(server.url + "/version", timeout=5)


def test_the_proxy_refuses_a_session_without_the_clusters_token(provider, kube, backend):
    server, _ = kube
    handle = create(provider)
    server.route_service(handle.sandbox_id, "web", backend)
    response = requests.get(handle.endpoints["web"] + "/v1/models", timeout=5)
    assert response.status_code == 401
    assert response.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "message": "Unauthorized",
                               "reason": "Unauthorized", "code": 401}


@pytest.mark.parametrize("key", ["BearerToken", "authorization"])
def test_the_session_sends_the_token_whichever_key_the_client_keeps_it_under(kube, backend,
                                                                            key):
    """kubernetes >= 36 keeps a kubeconfig's or pod's token in api_key["BearerToken"]; older
    clients (and code that sets it by hand) in api_key["authorization"]."""
    server, _ = kube
    server.store.create(TYPES["Service"], "default", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 8080}]}})
    server.store.create(TYPES["Pod"], "default", {"metadata": {"name": "web-0", "labels": {
        "app": "web"}}, "spec": {"containers": [{"name": "app", "image": "web:1"}]}})
    wait_until(lambda: diagnose.readiness("Pod", server.store.get(
        TYPES["Pod"], "default", "web-0")).ready, what="web-0 ready")
    server.route_service("default", "web", backend)
    configuration = k8s.Configuration(host=server.url,
                                      api_key={key: f"Bearer {server.admin_token}"})
    response = session_for(configuration).get(
        f"{server.url}/api/v1/namespaces/default/services/http:web:8080/proxy/ping", timeout=5)
    assert response.status_code == 200, response.text
    assert response.json() == {"path": "/ping", "ok": True}


def test_an_exec_plugins_token_is_fetched_again_when_it_is_rotated(tmp_path, kube, backend,
                                                                   monkeypatch):
    """An exec credential plugin (aws eks get-token, gke-gcloud-auth-plugin) hands out
    short-lived tokens: the client runs it again as the last one expires, and the session the
    UI smoke uses must take each new one, not the first it saw."""
    server, _ = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    token_file = tmp_path / "token"
    token_file.write_text(server.issue_token("ci-bot", ["system:masters"]))
    plugin = write_exec_plugin(tmp_path / "get-token", token_file)
    root = tmp_path / "exec-registry"
    (root / "k8s").mkdir(parents=True)
    for name, text in {"db.yaml": DB, "app.yaml": APP}.items():
        (root / "k8s" / name).write_text(text)
    server.kubeconfig(root / "kubeconfig.json", exec_command=plugin)
    provider = KubernetesProvider(tmp_path / "exec-home", [SECRET_ENV], root=root,
                                  settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                                  poll_interval_s=0.05)
    handle = create(provider)
    provider.wait_until_ready(handle, sandbox(), timeout_s=10)
    server.route_service(handle.sandbox_id, "web", backend)
    session = provider.http(handle)
    assert session.get(handle.endpoints["web"] + "/one", timeout=5).status_code == 200

    server.revoke_token(token_file.read_text())
    token_file.write_text(server.issue_token("ci-bot", ["system:masters"]))
    calls = len(Path(f"{plugin[0]}.calls").read_text().splitlines())
    response = session.get(handle.endpoints["web"] + "/two", timeout=5)

    assert response.status_code == 200, response.text
    assert len(Path(f"{plugin[0]}.calls").read_text().splitlines()) > calls
    assert provider.destroy(handle, timeout_s=10).clean


def test_an_in_cluster_token_file_is_read_again_after_it_rotates(tmp_path):
    """A pod's service account token file is rotated by the kubelet; the client reads it again
    once its refresh period has passed (a minute; none here), and the session takes it."""
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text("first-token")
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    loader = InClusterConfigLoader(str(token_file), str(ca_file), environ={
        "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    loader._token_refresh_period = datetime.timedelta(0)  # the client's own knob, a minute
    configuration = k8s.Configuration()
    loader.load_and_set(configuration)
    session = session_for(configuration)
    url = "https://10.96.0.1:443/api/v1/namespaces/x/services/web:80/proxy/"

    first = session.prepare_request(requests.Request("GET", url)).headers["Authorization"]
    token_file.write_text("second-token")
    second = session.prepare_request(requests.Request("GET", url)).headers["Authorization"]

    assert (first, second) == ("bearer first-token", "bearer second-token")


def test_collect_artifacts_keeps_pod_logs_events_and_statuses_redacted(provider, kube):
    server, controller = kube
    controller.behave("Deployment", "web", log=f"app: token {SECRET}\napp: ready\n")
    handle = create(provider)
    provider.wait_until_ready(handle, sandbox(), timeout_s=10)
    paths = [Path(p) for p in provider.collect_artifacts(handle)]
    names = {p.name for p in paths}
    web = next(p["metadata"]["name"] for p in server.objects("Pod", handle.sandbox_id)
               if p["metadata"]["name"].startswith("web-"))
    assert {f"k8s-pod-{web}-app.log", "k8s-pod-db-0-postgres.log", "k8s-events.json",
            "k8s-objects.json"} <= names
    assert "app: token ***" in (Path(handle.log_dir) / f"k8s-pod-{web}-app.log").read_text()
    objects = json.loads((Path(handle.log_dir) / "k8s-objects.json").read_text())
    kinds = {(o["kind"], o["name"]) for o in objects}
    assert {("Namespace", handle.sandbox_id), ("Deployment", "web"), ("StatefulSet", "db"),
            ("ConfigMap", "settings"), ("Pod", web)} <= kinds
    events = json.loads((Path(handle.log_dir) / "k8s-events.json").read_text())
    assert any(e["reason"] == "Scheduled" for e in events)
    assert all(SECRET not in p.read_text() for p in paths)


def test_an_unreachable_cluster_is_infra_and_its_sandbox_stays_in_the_ledger(provider, kube):
    server, _ = kube
    handle = create(provider)
    server.stop()
    paths = provider.collect_artifacts(handle)
    note = Path(handle.log_dir) / "k8s-unreachable.txt"
    assert str(note) in paths and "cannot reach the API server" in note.read_text()
    with pytest.raises(SandboxError) as unready:
        provider.wait_until_ready(handle, sandbox(), timeout_s=0.3)
    assert unready.value.kind == "infra" and "cannot reach the API server" in str(unready.value)
    report = provider.destroy(handle, timeout_s=2)
    assert not report.clean and "could not be deleted" in report.why
    assert "cannot reach the API server" in report.why
    assert [h.sandbox_id for h in provider.ledger.live()] == [handle.sandbox_id]


def test_destroy_deletes_the_namespace_verifies_it_and_is_idempotent(provider, kube):
    server, _ = kube
    handle = create(provider)
    report = provider.destroy(handle, timeout_s=10)
    assert report.clean and report.remote["namespace_gone"], report
    assert handle.sandbox_id not in server.namespaces()
    assert server.objects(namespace=handle.sandbox_id) == []
    assert provider.ledger.live() == [] and not Path(handle.workdir).exists()
    assert ("DELETE", f"/api/v1/namespaces/{handle.sandbox_id}") in server.requests
    assert provider.destroy(handle, timeout_s=2).clean


def test_a_namespace_that_takes_20s_to_go_is_torn_down_clean_within_the_default_teardown(
        registry, tmp_path, monkeypatch):
    """A real namespace takes tens of seconds to go (its pods' grace periods, the namespace
    controller's sweep of every API group): timeouts.teardown_s's default waits it out, and
    destroy deletes it and waits until the API says 404, as the README says; a teardown_s too
    short names what is still there. On a clock the test moves: each of the provider's polls
    is one pass of the controller."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    clock = ManualClock()
    with KubeApiServer(authentication=True, namespace_deletion_s=20) as server:
        controller = KubeController(server, clock=clock.monotonic)
        clock.on_sleep.append(controller.tick)
        server.kubeconfig(registry / "kubeconfig.json")
        provider = KubernetesProvider(tmp_path / "slow-home", [SECRET_ENV], root=registry,
                                      settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                                      sleep=clock.sleep, clock=clock.monotonic)
        hurried, patient = create(provider), create(provider)
        for _ in range(3):  # scheduled, running: pods that will take their grace to stop
            controller.tick()

        too_short = provider.destroy(hurried, timeout_s=10)
        started = clock.now
        report = provider.destroy(patient, timeout_s=DEFAULT_TIMEOUTS_S[Stage.TEARDOWN])
        waited = clock.now - started

        assert not too_short.clean and not too_short.remote["namespace_gone"]
        assert f"namespace {hurried.sandbox_id} is Terminating" in too_short.why
        assert "NamespaceContentRemaining: Some resources are remaining: pods. has 2 " \
               "resource instances" in too_short.why
        assert report.clean and report.remote["namespace_gone"], report
        assert 20 <= waited <= 22  # its 20 s, and a poll's worth
        assert patient.sandbox_id not in server.namespaces()
        assert [h.sandbox_id for h in provider.ledger.live()] == [hurried.sandbox_id]
        reads = [path for method, path in server.requests
                 if (method, path) == ("GET", f"/api/v1/namespaces/{patient.sandbox_id}")]
        assert len(reads) >= 10  # asked at each poll until it answered 404


def test_a_namespace_stuck_terminating_is_not_clean_and_names_its_finalizer(provider, kube):
    server, controller = kube
    controller.behave("Namespace", "stuck-*", failure="stuck-terminating")
    handle = create(provider, config="stuck")
    wait_until(lambda: "mlci.test/never-released" in json.dumps(
        server.objects("Namespace")), what="the finalizer")
    report = provider.destroy(handle, timeout_s=1)
    assert not report.clean and not report.remote["namespace_gone"]
    assert "is Terminating" in report.why
    assert "mlci.test/never-released" in report.why
    assert [h.sandbox_id for h in provider.ledger.live()] == [handle.sandbox_id]


def test_list_live_finds_a_sandbox_from_the_cluster_alone_and_the_janitor_reaps_it(
        provider, kube, tmp_path):
    server, _ = kube
    handle = create(provider, run_id="crashed-run")
    shutil.rmtree(tmp_path / "home" / "ledger")
    fresh = build_provider("kubernetes", tmp_path / "home", [SECRET_ENV], provider.root,
                           ClusterSpec(kubeconfig="kubeconfig.json"))
    assert isinstance(fresh, Provider)
    found = fresh.list_live()
    assert [h.to_dict() for h in found] == [handle.to_dict()]
    verdicts = sweep([fresh], run_over=lambda run_id: run_id == "crashed-run",
                     teardown_timeout=lambda _: 60)
    assert [(v.sandbox_id, v.reason) for v in verdicts] == [
        (handle.sandbox_id, "run crashed- is over")]
    assert verdicts[0].report.clean
    assert handle.sandbox_id not in server.namespaces()
    assert fresh.list_live() == []


def test_list_live_joins_the_ledger_and_the_cluster_once_each(provider, kube):
    server, _ = kube
    first, second = create(provider), create(provider)
    assert sorted(h.sandbox_id for h in provider.list_live()) == sorted(
        [first.sandbox_id, second.sandbox_id])
    server.stop()
    assert len(provider.list_live()) == 2  # the ledger still knows them


def test_a_command_pipeline_runs_here_with_the_sandbox_variables(provider, kube):
    handle = create(provider)
    code = "import os; print(os.environ['STORE'], os.environ['MLCI_SANDBOX_ID'])"
    done = provider.run_command(handle, "probe", [sys.executable, "-c", code], {},
                                timeout_s=20)
    assert done.exit_code == 0
    assert f"{handle.sandbox_id}-store {handle.sandbox_id}" in done.stdout_tail
    assert Path(done.log_path) == Path(handle.log_dir) / "pipeline-probe.log"


FAKE_K3D = """#!{python}
import json, shutil, sys
from pathlib import Path
state = Path({state!r})
clusters = json.loads(state.read_text()) if state.exists() else []
args = sys.argv[1:]
with open(str(state) + ".calls", "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[:2] == ["cluster", "create"]:
    clusters.append(args[2])
elif args[:2] == ["kubeconfig", "write"]:
    shutil.copy({kubeconfig!r}, args[args.index("--output") + 1])
elif args[:2] == ["cluster", "list"]:
    print("\\n".join(f"{{name}} 1/1 0/0 true" for name in clusters))
elif args[:2] == ["cluster", "delete"]:
    clusters = [c for c in clusters if c != args[2]]
state.write_text(json.dumps(clusters))
"""


def test_a_cluster_created_per_sandbox_is_deleted_with_it(provider, kube, registry, tmp_path,
                                                          monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "k3d-clusters.json"
    bin_dir.mkdir()
    (bin_dir / "k3d").write_text(FAKE_K3D.format(python=sys.executable, state=str(state),
                                                 kubeconfig=str(registry / "kubeconfig.json")))
    (bin_dir / "k3d").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = sandbox(cluster={"create": "k3d", "name": "ci"})
    handle = create(provider, spec)
    cluster = handle.state["cluster"]
    assert cluster["name"].startswith("ci-") and json.loads(state.read_text()) == [
        cluster["name"]]
    assert handle.sandbox_id in kube[0].namespaces()
    report = provider.destroy(handle, timeout_s=10)
    assert report.clean and report.remote["cluster"] == cluster["name"]
    assert json.loads(state.read_text()) == []
    calls = Path(str(state) + ".calls").read_text().splitlines()
    assert calls[0].startswith(f"cluster create {cluster['name']} --wait")
    assert f"cluster delete {cluster['name']}" in calls
    assert provider.ledger.live() == []


# --- the lifecycle's stages on a kubernetes sandbox ---------------------------------------------


def kubernetes_registry(root: Path, server: KubeApiServer, name: str = "served",
                        **overrides: Any) -> Path:
    served = config(
        name, image={"ref": IMAGE["ref"]}, **overrides,
        sandbox={"provider": "kubernetes", "cluster": {"kubeconfig": "kubeconfig.json"},
                 "manifests": ["k8s/app.yaml"],
                 "secrets": [{"name": "creds", "data": {"API_TOKEN": f"${{env.{SECRET_ENV}}}"}}],
                 "services": [{"name": "web", "service": "web", "port": 8080}]},
        pipelines=[{"kind": "k8s_job", "name": "train", "manifest": "k8s/train.yaml",
                    "outputs": {"run_id": r"run_id=(\d+)"}}],
        ui_smoke={"routes": [{"service": "web", "path": "/health?run=${outputs.train.run_id}",
                              "json_equals": {"ok": True}}]})
    write_registry(root, [served], secrets=[SECRET_ENV], engines={
        "e1": {"variables": {"STORE": "${sandbox.id}-store"}, "manifests": ["k8s/db.yaml"]}})
    (root / "k8s").mkdir()
    for name, text in {"db.yaml": DB, "app.yaml": APP, "train.yaml": TRAIN_JOB}.items():
        (root / "k8s" / name).write_text(text)
    server.kubeconfig(root / "kubeconfig.json")
    return root


@pytest.mark.parametrize("job_fails", [False, True])
def test_the_lifecycle_runs_on_a_namespace_and_always_tears_it_down(kube, backend, tmp_path,
                                                                    monkeypatch, job_fails):
    server, controller = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    controller.behave("Job", "train", log="run_id=42\n",
                      failure="fail" if job_fails else None)
    server.route_service(None, "web", backend)
    root = kubernetes_registry(tmp_path / "registry", server)
    ctx = LifecycleContext.create(load_registry(root), "served", "e1", "run-1", tmp_path / "home")
    outcomes = {str(o.stage): o for o in run_lifecycle(ctx)}
    statuses = {stage: str(o.status) for stage, o in outcomes.items()}
    assert statuses == {"image": "pass", "sandbox": "pass",
                        "pipeline_runs": "fail" if job_fails else "pass",
                        "ui_smoke": "skip" if job_fails else "pass", "teardown": "pass"}, \
        {stage: o.error_summary for stage, o in outcomes.items()}
    handle = outcomes["sandbox"].details.handle
    assert handle.sandbox_id not in server.namespaces()
    assert ctx.provider.list_live() == []
    if job_fails:
        assert str(outcomes["pipeline_runs"].failure_kind) == "product"
        assert outcomes["pipeline_runs"].error_summary.startswith(
            "pipeline 'train': Job train failed: Failed=True (BackoffLimitExceeded)")
        bundle = outcomes["teardown"].details.debug_bundle
        with tarfile.open(bundle) as tar:
            names = {Path(n).name for n in tar.getnames()}
        assert {"k8s-events.json", "k8s-objects.json", "pipeline-train.log"} <= names
    else:
        assert outcomes["pipeline_runs"].details.outputs == {"train": {"run_id": "42"}}
        route = outcomes["ui_smoke"].details.routes[0]
        assert route.url == f"{handle.endpoints['web']}/health?run=42"


def test_a_teardown_that_leaves_a_namespace_terminating_is_an_outage_naming_its_finalizer(
        kube, backend, tmp_path, monkeypatch):
    server, controller = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    controller.behave("Namespace", "stuck-*", failure="stuck-terminating")
    controller.behave("Job", "train", log="run_id=42\n")
    server.route_service(None, "web", backend)
    root = kubernetes_registry(tmp_path / "registry", server, "stuck", timeouts={
        "sandbox_s": 30, "pipeline_runs_s": 30, "ui_smoke_s": 30, "teardown_s": 1})
    ctx = LifecycleContext.create(load_registry(root), "stuck", "e1", "run-1", tmp_path / "home")

    outcomes = list(run_lifecycle(ctx))

    by_stage = {str(o.stage): o for o in outcomes}
    teardown = by_stage["teardown"]
    assert [str(o.status) for o in outcomes] == ["pass"] * 4 + ["fail"], \
        {stage: o.error_summary for stage, o in by_stage.items()}
    # The product passed; the cluster could not delete its namespace within teardown_s.
    assert teardown.failure_kind is INFRA
    assert "not fully destroyed within timeouts.teardown_s (1s): namespace stuck-e1-" in \
        teardown.error_summary
    assert "is Terminating" in teardown.error_summary
    assert "mlci.test/never-released" in teardown.error_summary
    # Still listed, for the janitor to try again.
    assert [h.config for h in ctx.provider.list_live()] == ["stuck"]
    # History counts it as an outage: not a flake of this build, nor a regression to bisect.
    stuck = build_record(ctx, outcomes)
    assert (stuck.status, stuck.failure_kind) == ("fail-teardown", INFRA)
    passed_before = stuck.model_copy(update={
        "status": "pass", "failed_stage": None, "failure_kind": None, "error_summary": "",
        "run_id": "run-0", "started_at": stuck.started_at - 3600,
        "finished_at": stuck.finished_at - 3600})
    table = append_rows(None, [record_to_row(passed_before, 1), record_to_row(stuck, 2)])
    [summary] = analyze(table, [stuck.partition], HistorySettings(), stuck.finished_at)
    assert summary.status is PartitionStatus.BROKEN
    assert not summary.flakiness.flaky and summary.regression is None


def test_the_janitor_and_a_runs_cleanup_wait_the_configs_teardown_s_for_a_stuck_namespace(
        kube, tmp_path, monkeypatch, instance, dagster_home):
    server, controller = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    controller.behave("Namespace", "stuck-*", failure="stuck-terminating")
    root = kubernetes_registry(tmp_path / "registry", server, "stuck", timeouts={
        "sandbox_s": 30, "pipeline_runs_s": 30, "ui_smoke_s": 30, "teardown_s": 2})
    registry = load_registry(root)
    [provider] = [p for p in registry_providers(registry, dagster_home / "mlci")
                  if p.name == "kubernetes"]
    spec = registry.configs["stuck"].config.sandbox
    stuck = provider.create(spec, config="stuck", engine="e1", run_id="failed-run",
                            engine_variables=ENGINE_VARIABLES, teardown_s=2, image=IMAGE)
    # A sandbox whose config has since left the registry gets the registry's default.
    gone = provider.create(spec, config="gone", engine="e1", run_id="crashed-run",
                           engine_variables=ENGINE_VARIABLES, teardown_s=2, image=IMAGE)
    wait_until(lambda: "mlci.test/never-released" in json.dumps(
        server.objects("Namespace")), what="the finalizer")
    waits: list[tuple[str, float | None]] = []
    destroy = KubernetesProvider.destroy

    def recorded(self: KubernetesProvider, handle: SandboxHandle, **kwargs: Any):
        waits.append((handle.config, kwargs.get("timeout_s")))
        return destroy(self, handle, **kwargs)

    monkeypatch.setattr(KubernetesProvider, "destroy", recorded)
    resources = build_definitions(root).resources

    started = time.monotonic()
    [reaped] = resources["mlci"].reap_run(instance, "failed-run")
    reaped_in = time.monotonic() - started

    assert waits == [("stuck", 2)]
    assert reaped.sandbox_id == stuck.sandbox_id and not reaped.report.clean
    assert "is Terminating" in reaped.report.why
    assert reaped_in < 30  # not the 60 s a destroy without the config's timeout would take

    waits.clear()
    started = time.monotonic()
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = sandbox_janitor(context)
    swept_in = time.monotonic() - started

    assert sorted(waits) == [("gone", DEFAULT_TIMEOUTS_S[Stage.TEARDOWN]), ("stuck", 2)]
    [observation] = result.asset_events
    reports = {v["sandbox_id"]: v["report"] for v in observation.metadata["sandboxes"].value}
    assert reports[gone.sandbox_id]["clean"] and not reports[stuck.sandbox_id]["clean"]
    assert swept_in < 30
    # Left for the next pass, and named as left.
    assert [h.sandbox_id for h in provider.list_live()] == [stuck.sandbox_id]


def test_a_manifest_of_the_tests_own_that_cannot_be_used_fails_as_config(
        provider, kube, registry):
    """A document that is no object, or a reference that does not resolve, is the test's own
    mistake (`config`), not the cluster's; what was made before it is deleted all the same."""
    server, _ = kube
    (registry / "k8s" / "broken.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SandboxError) as failed:
        create(provider, sandbox(manifests=["k8s/db.yaml", "k8s/broken.yaml"]))
    assert failed.value.kind == "config"
    assert "k8s/broken.yaml: document 1: expected a mapping" in str(failed.value)
    assert [n for n in server.namespaces() if n.startswith("train-")] == []
    assert provider.ledger.live() == []


# --- an API server that throttles and fails --------------------------------------------------

NOT_THE_PROXY = r"^(?!.*/proxy(/|$))"  # the UI smoke's routes answer for the service, not the API


def a_storm(server: KubeApiServer, scale: int = 1, throttled: int = 3,
            errors: tuple[int, ...] = (503, 500, 504)) -> list[Any]:
    """A burst of what a busy API server answers: API Priority and Fairness's 429s, a
    TooManyRequests Status, then 5xx and a dropped connection on reads."""
    return [server.inject(429, plain=True, count=throttled * scale, path_regex=NOT_THE_PROXY),
            server.inject(429, retry_after=1, count=scale, path_regex=NOT_THE_PROXY),
            *[server.inject(status, count=scale, methods=("GET",), path_regex=NOT_THE_PROXY)
              for status in errors],
            server.inject(reset=True, count=scale, methods=("GET",), path_regex=NOT_THE_PROXY)]


def test_a_429_storm_is_survived_from_create_to_destroy(kube, registry, tmp_path, monkeypatch):
    """create → ready → a k8s_job pipeline → destroy while the API server throttles every verb
    and fails reads: each call waits as Retry-After says (here on a recorded sleep), or backs
    off, and succeeds."""
    server, controller = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    controller.behave("Job", "train", log="run_id=42\n")
    slept: list[float] = []
    provider = KubernetesProvider(tmp_path / "storm-home", [SECRET_ENV], root=registry,
                                  settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                                  poll_interval_s=0.05, retry=RetryPolicy(sleep=slept.append))
    storms = [a_storm(server, scale=2)]

    handle = create(provider)
    storms.append(a_storm(server))
    provider.wait_until_ready(handle, sandbox(), timeout_s=10)
    storms.append(a_storm(server))
    result = provider.run_pipeline(handle, job_pipeline(outputs={"RUN_ID": r"run_id=(\d+)"}),
                                   context_of(handle), timeout_s=10)
    storms.append(a_storm(server))
    report = provider.destroy(handle, timeout_s=60)

    assert result.passed and result.outputs == {"RUN_ID": "42"}, result.summary
    assert report.clean and handle.sandbox_id not in server.namespaces(), report
    assert [f.answered for storm in storms for f in storm] == [
        f.count for storm in storms for f in storm]  # every fault was met, and survived
    assert slept.count(1.0) >= 4 * 5  # Retry-After: 1 (APF's and the Status's), each storm


def test_a_storm_that_never_ends_fails_create_as_infra_in_bounded_time(
        kube, registry, tmp_path, monkeypatch):
    server, _ = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    clock = ManualClock()
    provider = KubernetesProvider(tmp_path / "endless-home", [SECRET_ENV], root=registry,
                                  settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                                  retry=RetryPolicy(sleep=clock.sleep, clock=clock.monotonic))
    endless = server.inject(429, plain=True, count=None)
    started = time.monotonic()

    with pytest.raises(SandboxError) as failed:
        create(provider)

    message = str(failed.value)
    [namespace] = [h.sandbox_id for h in provider.ledger.live()]  # left for the janitor
    assert failed.value.kind == "infra"
    assert message.startswith(
        f"sandbox {namespace} could not be created: create namespace {namespace}: gave up "
        f"after 10 attempts in 9.0s: the API server {server.url} answered 429 Too Many "
        "Requests: Too many requests, please try again later.")
    assert f"namespace {namespace} could not be deleted: delete namespace {namespace}: gave " \
           "up after 10 attempts in 9.0s" in message
    assert endless.answered == 20  # create's ten, and the cleanup's ten
    assert clock.slept == [1.0] * 18  # as Retry-After said, never past the attempts
    assert time.monotonic() - started < 10


def test_reads_failing_with_5xx_until_the_timeout_fail_readiness_as_infra(
        kube, registry, tmp_path, monkeypatch):
    """A 5xx without Retry-After is retried for reads only, with a backoff, a bounded number of
    times; the readiness wait then ends as the API server's fault, naming the answer."""
    server, _ = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    clock = ManualClock()
    provider = KubernetesProvider(tmp_path / "failing-home", [SECRET_ENV], root=registry,
                                  settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                                  retry=RetryPolicy(sleep=clock.sleep, clock=clock.monotonic))
    handle = create(provider)
    server.inject(503, count=None, methods=("GET",),
                  path_regex=rf"/namespaces/{handle.sandbox_id}/")

    with pytest.raises(SandboxError) as failed:
        provider.wait_until_ready(handle, sandbox(), timeout_s=0.5)

    assert failed.value.kind == "infra", str(failed.value)
    assert "gave up after 10 attempts in 47.5s: the API server" in str(failed.value)
    assert "503 Service Unavailable: the server is currently unable to handle the request" in \
        str(failed.value)
    assert clock.slept[:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    server.clear_faults()
    assert provider.destroy(handle, timeout_s=60).clean


def test_the_lifecycle_survives_a_429_storm(kube, backend, tmp_path, monkeypatch):
    """The whole lifecycle, stages and all, with the provider the registry builds (its real
    retry policy, its real sleeps: Retry-After 1 is what API Priority and Fairness sends), so
    a short burst: about 4 s of waiting."""
    server, controller = kube
    monkeypatch.setenv(SECRET_ENV, SECRET)
    controller.behave("Job", "train", log="run_id=42\n")
    server.route_service(None, "web", backend)
    root = kubernetes_registry(tmp_path / "registry", server)
    ctx = LifecycleContext.create(load_registry(root), "served", "e1", "run-1", tmp_path / "home")
    storm = a_storm(server, throttled=2, errors=(503,))

    outcomes = {str(o.stage): o for o in run_lifecycle(ctx)}

    assert {stage: str(o.status) for stage, o in outcomes.items()} == dict.fromkeys(
        ["image", "sandbox", "pipeline_runs", "ui_smoke", "teardown"], "pass"), \
        {stage: o.error_summary for stage, o in outcomes.items()}
    assert [f.answered for f in storm] == [f.count for f in storm]
    assert ctx.provider.list_live() == []
