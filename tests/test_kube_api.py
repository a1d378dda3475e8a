"""The Kubernetes API emulator, through the official client over real HTTP on loopback: the
wire subset (discovery, verbs, errors, selectors, watches, logs, service proxy), namespace
termination, the controller's healthy and failing workloads as the upstream types shape them
(kubernetes/api `core/v1/types.go` and `apps/v1/types.go`: container waiting reasons, Deployment
conditions, namespace deletion; ray-project/kuberay `ray-operator/apis/ray/v1/rayjob_types.go`;
kubeflow/spark-operator `api/v1beta2/sparkapplication_types.go`), and bearer-token
authentication and RBAC with the bodies a real server answers."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import requests
from kubernetes.client import (
    ApiClient,
    AppsV1Api,
    BatchV1Api,
    CoreV1Api,
    CustomObjectsApi,
    VersionApi,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.watch import Watch

from tests.support.kube_controller import STUCK_FINALIZER, TRACEBACK, Failure, KubeController
from tests.support.kube_store import (
    NAMESPACE_DELETION_S,
    RESOURCE_TYPES,
    TYPES,
    ManualClock,
    wait_until,
)
from tests.support.kube_wire import KubeApiServer, write_exec_plugin


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        yield server


@pytest.fixture
def client(api: KubeApiServer, tmp_path: Path) -> Iterator[ApiClient]:
    config = api.kubeconfig(tmp_path / "kubeconfig")
    api_client = kubernetes.config.new_client_from_config(config_file=str(config))
    yield api_client
    api_client.close()


@pytest.fixture
def core(client: ApiClient) -> CoreV1Api:
    return CoreV1Api(client)


@pytest.fixture
def controller(api: KubeApiServer) -> Iterator[KubeController]:
    with KubeController(api, interval_s=0.02) as running:
        yield running
    assert running.errors == []


def status_body(error: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    return json.loads(error.value.body)


def pod_manifest(name: str, labels: dict[str, str] | None = None, restart: str = "Always",
                 containers: tuple[str, ...] = ("main",)) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": restart,
                     "containers": [{"name": c, "image": "python:3.11"} for c in containers]}}


def deployment_manifest(name: str, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": name, "image": f"example.test/{name}:1"}]}}}}


def job_manifest(name: str, backoff_limit: int = 0) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"backoffLimit": backoff_limit, "template": {
        "metadata": {"labels": {"team": "ml"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "train", "image": "t:1"}]}}}}


def events_for(core: CoreV1Api, name: str, namespace: str = "default") -> list[Any]:
    return [e for e in core.list_namespaced_event(namespace).items
            if e.involved_object.name == name]


def watched(api_call: Any, *args: Any, until: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The raw objects a watch delivers until one satisfies until (or 10 s pass)."""
    seen, watch = [], Watch()
    for event in watch.stream(api_call, *args, timeout_seconds=10, **kwargs):
        seen.append(event["raw_object"])
        if until(event["raw_object"]):
            watch.stop()
    return seen


def transitions(objects: list[dict[str, Any]], state_of: Any) -> list[Any]:
    """The successive distinct states of an object's status, as a watch saw them."""
    states: list[Any] = []
    for obj in objects:
        state = state_of(obj.get("status") or {})
        if not states or states[-1] != state:
            states.append(state)
    return states


# --- discovery and the client's configuration

def test_discovery_lets_the_dynamic_client_find_every_resource_type(
        client: ApiClient, tmp_path: Path) -> None:
    dynamic = DynamicClient(client, cache_file=str(tmp_path / "discovery.json"))

    for rtype in RESOURCE_TYPES:
        resource = dynamic.resources.get(api_version=rtype.api_version, kind=rtype.kind)
        assert (resource.name, resource.namespaced) == (rtype.plural, rtype.namespaced)
    pods = dynamic.resources.get(api_version="v1", kind="Pod")
    assert set(pods.subresources) == {"status", "log"}
    assert set(dynamic.resources.get(api_version="v1", kind="Service").subresources) == {
        "status", "proxy"}
    assert VersionApi(client).get_code().git_version.startswith("v1.")


def test_dynamic_client_creates_gets_and_lists_a_rayjob_and_a_deployment(
        api: KubeApiServer, client: ApiClient, tmp_path: Path) -> None:
    dynamic = DynamicClient(client, cache_file=str(tmp_path / "discovery.json"))
    rayjobs = dynamic.resources.get(api_version="ray.io/v1", kind="RayJob")
    deployments = dynamic.resources.get(api_version="apps/v1", kind="Deployment")

    dynamic.create(rayjobs, namespace="default", body={
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": "train", "labels": {"team": "ml"}},
        "spec": {"entrypoint": "python train.py"}})
    dynamic.create(deployments, namespace="default", body=deployment_manifest("mlflow"))

    rayjob = dynamic.get(rayjobs, name="train", namespace="default")
    assert rayjob.spec.entrypoint == "python train.py"
    assert [r.metadata.name for r in dynamic.get(rayjobs, label_selector="team=ml").items] == [
        "train"]
    assert dynamic.get(deployments, namespace="default").items[0].metadata.name == "mlflow"
    assert ("POST", "/apis/ray.io/v1/namespaces/default/rayjobs") in api.requests
    assert ("GET", "/apis/apps/v1/namespaces/default/deployments") in api.requests
    assert [o["metadata"]["name"] for o in api.objects("RayJob", "default")] == ["train"]


# --- namespaces

def test_namespace_deletion_terminates_then_removes_it_with_its_content(
        api: KubeApiServer, core: CoreV1Api) -> None:
    """A real namespace takes a while to go (its pods get their grace period): this one stays
    Terminating for the server's namespace_deletion_s, its pod terminating gracefully, the rest
    of its content gone at once, then goes."""
    clock = ManualClock()
    namespace_controller = KubeController(api, clock=clock.monotonic)
    core.create_namespace({"metadata": {"name": "team-a"}})
    core.create_namespaced_config_map("team-a", {"metadata": {"name": "settings"}})
    core.create_namespaced_pod("team-a", pod_manifest("worker"))
    assert "team-a" in [ns.metadata.name for ns in core.list_namespace().items]

    core.delete_namespace("team-a")

    terminating = core.read_namespace("team-a")
    assert terminating.status.phase == "Terminating"
    assert terminating.metadata.deletion_timestamp is not None
    with pytest.raises(ApiException) as forbidden:
        core.create_namespaced_config_map("team-a", {"metadata": {"name": "late"}})
    assert forbidden.value.status == 403 and status_body(forbidden)["reason"] == "Forbidden"
    with pytest.raises(ApiException) as again:
        core.delete_namespace("team-a")
    assert again.value.status == 409

    namespace_controller.tick()  # its first pass: content deleted, the pod given its grace
    clock.advance(NAMESPACE_DELETION_S - 0.1)
    namespace_controller.tick()

    assert core.read_namespace("team-a").status.phase == "Terminating"
    assert [c.metadata.name for c in core.list_namespaced_config_map("team-a").items] == []
    worker = core.read_namespaced_pod("worker", "team-a")
    assert worker.metadata.deletion_timestamp is not None
    assert worker.metadata.deletion_grace_period_seconds == 1
    conditions = {c.type: c for c in core.read_namespace("team-a").status.conditions}
    assert (conditions["NamespaceContentRemaining"].status,
            conditions["NamespaceContentRemaining"].message) == (
        "True", "Some resources are remaining: pods. has 1 resource instances")

    clock.advance(0.1)
    namespace_controller.tick()

    assert "team-a" not in api.namespaces()
    assert api.objects(namespace="team-a") == []
    with pytest.raises(ApiException) as gone:
        core.read_namespace("team-a")
    assert gone.value.status == 404


def test_a_namespace_takes_its_servers_deletion_time_to_go(tmp_path: Path) -> None:
    """As a client sees it, with the controller running: Terminating, then 404 once the
    server's namespace_deletion_s has passed, never before."""
    with KubeApiServer(namespace_deletion_s=0.6) as slow, KubeController(
            slow, interval_s=0.02), kubernetes.config.new_client_from_config(
                config_file=str(slow.kubeconfig(tmp_path / "slow"))) as client:
        slow_core = CoreV1Api(client)
        slow_core.create_namespace({"metadata": {"name": "team-b"}})
        started = time.monotonic()
        slow_core.delete_namespace("team-b")

        def gone() -> bool:
            try:
                slow_core.read_namespace("team-b")
            except ApiException as error:
                return error.status == 404
            return False
        wait_until(gone, timeout_s=5, what="the namespace gone")

    assert 0.6 <= time.monotonic() - started < 2
    assert KubeApiServer().store.namespace_deletion_s == NAMESPACE_DELETION_S == 1.0


def test_a_namespace_finalizer_keeps_it_terminating_until_released(
        api: KubeApiServer, core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "held"},
                           "spec": {"finalizers": ["example.com/hold"]}})
    core.create_namespaced_config_map("held", {"metadata": {"name": "settings"}})
    core.delete_namespace("held")
    clock = ManualClock()
    namespace_controller = KubeController(api, clock=clock.monotonic)

    for _ in range(3):
        namespace_controller.tick()
        clock.advance(NAMESPACE_DELETION_S)

    held = core.read_namespace("held")
    assert held.status.phase == "Terminating"
    assert held.spec.finalizers == ["example.com/hold"]  # "kubernetes" was removed
    conditions = {c.type: c for c in held.status.conditions}
    remaining = conditions["NamespaceFinalizersRemaining"]
    assert (remaining.status, remaining.reason) == ("True", "SomeFinalizersRemain")
    assert "example.com/hold" in remaining.message
    assert conditions["NamespaceContentRemaining"].status == "False"
    assert api.objects(namespace="held") == []

    core.replace_namespace_finalize("held", {"metadata": {"name": "held"},
                                             "spec": {"finalizers": []}})
    assert "held" not in api.namespaces()


def test_content_with_finalizers_holds_the_namespace_until_they_go(
        api: KubeApiServer, core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "busy"}})
    core.create_namespaced_config_map("busy", {"metadata": {
        "name": "guarded", "finalizers": ["example.com/backup"]}})
    core.delete_namespace("busy")
    clock = ManualClock()
    namespace_controller = KubeController(api, clock=clock.monotonic)
    namespace_controller.tick()
    clock.advance(NAMESPACE_DELETION_S)

    conditions = {c.type: c for c in core.read_namespace("busy").status.conditions}
    assert conditions["NamespaceContentRemaining"].reason == "SomeResourcesRemain"
    assert "example.com/backup in 1 resource instances" in conditions[
        "NamespaceFinalizersRemaining"].message
    assert core.read_namespaced_config_map("guarded", "busy").metadata.deletion_timestamp

    core.patch_namespaced_config_map("guarded", "busy", {"metadata": {"finalizers": None}})
    namespace_controller.tick()
    assert "busy" not in api.namespaces()  # its deletion time is over meanwhile


def test_stuck_namespace_behaviour_holds_it_terminating(
        api: KubeApiServer, core: CoreV1Api, controller: KubeController) -> None:
    controller.behave("Namespace", "stuck", failure=Failure.STUCK_TERMINATING)
    core.create_namespace({"metadata": {"name": "stuck"}})
    wait_until(lambda: core.read_namespace("stuck").metadata.finalizers, what="the finalizer")

    core.delete_namespace("stuck")

    def finalizers_condition() -> Any:
        conditions = core.read_namespace("stuck").status.conditions or []
        return next((c for c in conditions if c.type == "NamespaceFinalizersRemaining"
                     and c.status == "True"), None)
    condition = wait_until(finalizers_condition, what="NamespaceFinalizersRemaining")
    assert condition.reason == "SomeFinalizersRemain" and STUCK_FINALIZER in condition.message
    time.sleep(0.2)
    assert core.read_namespace("stuck").status.phase == "Terminating"


def test_creating_in_a_missing_namespace_is_not_found(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as missing:
        core.create_namespaced_pod("nowhere", pod_manifest("p"))

    assert missing.value.status == 404
    assert status_body(missing)["details"] == {"name": "nowhere", "kind": "namespaces"}


# --- verbs and their errors

def test_not_found_and_already_exists_answer_status_bodies(
        client: ApiClient, core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("nope", "default")
    with pytest.raises(ApiException) as missing_deployment:
        AppsV1Api(client).read_namespaced_deployment("nope", "default")
    core.create_namespaced_config_map("default", {"metadata": {"name": "once"}})
    with pytest.raises(ApiException) as twice:
        core.create_namespaced_config_map("default", {"metadata": {"name": "once"}})

    body = status_body(missing)
    assert (missing.value.status, body["kind"], body["status"], body["reason"], body["code"]) == (
        404, "Status", "Failure", "NotFound", 404)
    assert body["message"] == 'pods "nope" not found'
    assert status_body(missing_deployment)["details"] == {
        "name": "nope", "group": "apps", "kind": "deployments"}
    assert twice.value.status == 409 and status_body(twice)["reason"] == "AlreadyExists"
    assert status_body(twice)["message"] == 'configmaps "once" already exists'


def test_a_stale_resource_version_conflicts(core: CoreV1Api) -> None:
    created = core.create_namespaced_config_map("default", {"metadata": {"name": "c"},
                                                            "data": {"v": "1"}})
    stale = created.metadata.resource_version
    created.data = {"v": "2"}
    updated = core.replace_namespaced_config_map("c", "default", created)
    created.data = {"v": "3"}

    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("c", "default", created)  # still carries stale

    assert int(updated.metadata.resource_version) > int(stale)
    assert conflict.value.status == 409 and status_body(conflict)["reason"] == "Conflict"
    assert "the object has been modified" in status_body(conflict)["message"]
    assert core.read_namespaced_config_map("c", "default").data == {"v": "2"}


def test_generate_name_uid_creation_timestamp_and_increasing_versions(core: CoreV1Api) -> None:
    first = core.create_namespaced_pod("default", {"metadata": {"generateName": "worker-"},
                                                   "spec": {"containers": [{"name": "c"}]}})
    second = core.create_namespaced_pod("default", {"metadata": {"generateName": "worker-"},
                                                    "spec": {"containers": [{"name": "c"}]}})

    assert re.fullmatch(r"worker-[a-z0-9]{5}", first.metadata.name)
    assert first.metadata.name != second.metadata.name
    assert first.metadata.uid != second.metadata.uid
    assert first.metadata.creation_timestamp is not None
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert first.status.phase == "Pending"


POD_LABELS = {("default", "web-1"): {"app": "web", "tier": "front"},
              ("default", "db-1"): {"app": "db", "tier": "back"},
              ("team-b", "web-2"): {"app": "web"},
              ("team-b", "cron-1"): {"batch": "yes"}}


@pytest.fixture
def labelled_pods(core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "team-b"}})
    for (namespace, name), labels in POD_LABELS.items():
        core.create_namespaced_pod(namespace, pod_manifest(name, labels))


@pytest.mark.parametrize(("selector", "expected"), [
    ("app=web", {"web-1", "web-2"}),
    ("app==db", {"db-1"}),
    ("app!=web", {"db-1", "cron-1"}),
    ("app in (web, db)", {"web-1", "web-2", "db-1"}),
    ("app notin (web)", {"db-1", "cron-1"}),
    ("tier", {"web-1", "db-1"}),
    ("!tier", {"web-2", "cron-1"}),
    ("app=web,tier=front", {"web-1"}),
    ("app in (web),!tier", {"web-2"}),
])
def test_label_selectors_across_namespaces(core: CoreV1Api, labelled_pods: None,
                                           selector: str, expected: set[str]) -> None:
    pods = core.list_pod_for_all_namespaces(label_selector=selector).items
    assert {p.metadata.name for p in pods} == expected


def test_selectors_within_a_namespace_and_on_fields(core: CoreV1Api, labelled_pods: None) -> None:
    def names(**kwargs: Any) -> set[str]:
        pods = (core.list_namespaced_pod(kwargs.pop("namespace"), **kwargs)
                if "namespace" in kwargs else core.list_pod_for_all_namespaces(**kwargs))
        return {p.metadata.name for p in pods.items}

    assert names(namespace="team-b", label_selector="app=web") == {"web-2"}
    assert names(field_selector="metadata.name=web-2") == {"web-2"}
    assert names(field_selector="metadata.namespace=team-b") == {"web-2", "cron-1"}
    assert names(field_selector="metadata.namespace!=team-b,metadata.name=db-1") == {"db-1"}
    with pytest.raises(ApiException) as invalid:
        core.list_pod_for_all_namespaces(label_selector="app in web")
    assert invalid.value.status == 400


def test_patches_merge_strategic_and_json(core: CoreV1Api) -> None:
    core.create_namespaced_config_map("default", {"metadata": {
        "name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"k": "v"}})

    core.patch_namespaced_config_map("c", "default", {"metadata": {"labels": {"b": None,
                                                                              "c": "3"}}})
    core.patch_namespaced_config_map("c", "default", {"data": {"k2": "v2"}},
                                     _content_type="application/merge-patch+json")
    patched = core.patch_namespaced_config_map(
        "c", "default", [{"op": "replace", "path": "/data/k", "value": "w"},
                         {"op": "add", "path": "/metadata/labels/d", "value": "4"}])

    assert patched.metadata.labels == {"a": "1", "c": "3", "d": "4"}
    assert patched.data == {"k": "w", "k2": "v2"}


def test_the_status_subresource_is_written_apart_from_the_spec(client: ApiClient) -> None:
    apps = AppsV1Api(client)
    created = apps.create_namespaced_deployment("default", deployment_manifest("web"))
    assert created.metadata.generation == 1

    apps.patch_namespaced_deployment_status("web", "default", {
        "status": {"replicas": 7}, "spec": {"replicas": 9}})
    after_status = apps.read_namespaced_deployment("web", "default")
    after_status.spec.replicas = 3
    after_status.status.replicas = 0
    replaced = apps.replace_namespaced_deployment("web", "default", after_status)

    assert (after_status.metadata.generation, replaced.metadata.generation) == (1, 2)
    assert (replaced.spec.replicas, replaced.status.replicas) == (3, 7)


def test_deleting_an_owner_cascades_but_a_job_orphans_its_pods_by_default(
        api: KubeApiServer, client: ApiClient, core: CoreV1Api) -> None:
    batch = BatchV1Api(client)
    for name in ("orphaning", "cascading"):
        job = batch.create_namespaced_job("default", job_manifest(name))
        pod = pod_manifest(f"{name}-pod")
        pod["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                               "name": name, "uid": job.metadata.uid,
                                               "controller": True}]
        core.create_namespaced_pod("default", pod)

    batch.delete_namespaced_job("orphaning", "default")
    batch.delete_namespaced_job("cascading", "default", propagation_policy="Background")

    assert [p["metadata"]["name"] for p in api.objects("Pod")] == ["orphaning-pod"]
    assert core.read_namespaced_pod("orphaning-pod", "default").metadata.owner_references is None
    assert api.objects("Job") == []


# --- watches

def test_watch_streams_added_modified_deleted_as_they_happen(core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "watched"}})
    start = core.list_namespaced_pod("watched").metadata.resource_version
    events: list[tuple[str, str, dict[str, str] | None]] = []
    watch = Watch()

    def consume() -> None:
        for event in watch.stream(core.list_namespaced_pod, "watched", resource_version=start,
                                  timeout_seconds=10):
            pod = event["object"]
            events.append((event["type"], pod.metadata.name, pod.metadata.labels))
            if event["type"] == "DELETED":
                watch.stop()

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.2)  # the watch is open before anything changes
    core.create_namespaced_pod("default", pod_manifest("elsewhere"))
    core.create_namespaced_pod("watched", pod_manifest("p"))
    core.patch_namespaced_pod("p", "watched", {"metadata": {"labels": {"stage": "two"}}})
    core.delete_namespaced_pod("p", "watched")
    consumer.join(timeout=10)

    assert events == [("ADDED", "p", None), ("MODIFIED", "p", {"stage": "two"}),
                      ("DELETED", "p", {"stage": "two"})]


def test_watch_without_a_version_lists_first_and_ends_at_its_timeout(
        api: KubeApiServer, core: CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod_manifest("existing"))
    started = time.monotonic()

    events = list(Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=1))

    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "existing")]
    assert 0.9 < time.monotonic() - started < 3
    assert ("GET", "/api/v1/namespaces/default/pods") in api.requests


def test_stopping_the_server_ends_an_open_watch(api: KubeApiServer, core: CoreV1Api) -> None:
    consumer = threading.Thread(target=lambda: list(Watch().stream(
        core.list_namespaced_pod, "default", timeout_seconds=60)), daemon=True)
    consumer.start()
    time.sleep(0.2)

    api.stop()

    consumer.join(timeout=5)
    assert not consumer.is_alive()


# --- pod logs

def test_pod_logs_honour_tail_lines_timestamps_and_containers(
        core: CoreV1Api, controller: KubeController) -> None:
    controller.behave("Pod", "trainer", log="epoch 1\nepoch 2\nepoch 3")
    core.create_namespaced_pod("default", pod_manifest("trainer", restart="Never"))
    core.create_namespaced_pod("default", pod_manifest("pair", containers=("app", "sidecar")))
    wait_until(lambda: core.read_namespaced_pod("trainer", "default").status.phase == "Succeeded")
    wait_until(lambda: core.read_namespaced_pod("pair", "default").status.phase == "Running")

    def log(name: str, **kwargs: Any) -> str:
        return core.read_namespaced_pod_log(name, "default", _preload_content=False,
                                            **kwargs).data.decode()

    assert log("trainer") == "epoch 1\nepoch 2\nepoch 3\n"
    assert log("trainer", tail_lines=2) == "epoch 2\nepoch 3\n"
    stamped = log("trainer", timestamps=True).splitlines()
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z epoch \d", line)
               for line in stamped)
    assert log("pair", container="sidecar") == "sidecar: starting\nsidecar: ready\n"
    with pytest.raises(ApiException) as ambiguous:
        log("pair")
    assert ambiguous.value.status == 400
    assert "a container name must be specified" in status_body(ambiguous)["message"]


def test_pod_logs_honour_limit_bytes_as_the_kubelet_does(
        core: CoreV1Api, controller: KubeController) -> None:
    """The kubelet (pkg/kubelet/kuberuntime/logs/logs.go ReadLogs) selects the last tailLines
    lines first, then writes them (timestamps included) until limitBytes bytes are out: the
    head of the selection, cut mid-line."""
    controller.behave("Pod", "trainer", log="epoch 1\nepoch 2\nepoch 3")
    core.create_namespaced_pod("default", pod_manifest("trainer", restart="Never"))
    wait_until(lambda: core.read_namespaced_pod("trainer", "default").status.phase == "Succeeded")

    def log(**kwargs: Any) -> str:
        return core.read_namespaced_pod_log("trainer", "default", _preload_content=False,
                                            **kwargs).data.decode()

    assert log(limit_bytes=10) == "epoch 1\nep"
    assert log(tail_lines=2, limit_bytes=10) == "epoch 2\nep"
    assert log(limit_bytes=1000) == "epoch 1\nepoch 2\nepoch 3\n"
    stamped = log(timestamps=True, limit_bytes=40)
    assert len(stamped) == 40 and re.match(r"\d{4}-\d\d-\d\dT", stamped)
    with pytest.raises(ApiException) as invalid:
        log(limit_bytes=0)
    assert invalid.value.status == 422
    assert status_body(invalid)["message"] == (
        'PodLogOptions "trainer" is invalid: limitBytes: Invalid value: 0: must be greater '
        "than 0")


def test_previous_is_the_last_terminated_run_of_a_container_or_a_400(
        core: CoreV1Api, controller: KubeController) -> None:
    """`previous` reads the run lastState.terminated names, by its container ID (kubelet
    pkg/kubelet/kubelet_pods.go validateContainerLogStatus); a container that never restarted
    has none."""
    controller.behave("Pod", "flaky", failure="crash-loop")
    core.create_namespaced_pod("default", pod_manifest("flaky"))
    core.create_namespaced_pod("default", pod_manifest("steady"))
    core.create_namespaced_pod("default", pod_manifest("once", restart="Never"))

    def crashed() -> Any:
        pod = core.read_namespaced_pod("flaky", "default")
        statuses = pod.status.container_statuses or []
        return statuses and statuses[0].restart_count >= 2 and statuses[0]
    status = wait_until(crashed, what="restarts")
    wait_until(lambda: core.read_namespaced_pod("once", "default").status.phase == "Succeeded")
    wait_until(lambda: core.read_namespaced_pod("steady", "default").status.phase == "Running")

    def log(name: str, **kwargs: Any) -> str:
        return core.read_namespaced_pod_log(name, "default", _preload_content=False,
                                            **kwargs).data.decode()

    assert status.last_state.terminated.container_id.startswith("containerd://")
    assert log("flaky", previous=True) == f"{TRACEBACK}\n"
    assert log("flaky", previous=True, tail_lines=1) == f"{TRACEBACK.splitlines()[-1]}\n"
    assert log("flaky") == f"{TRACEBACK}\n"  # backing off: its last run's, as kubectl shows
    assert log("once") == "main: starting\nmain: ready\nmain: done\n"
    for never_restarted in ("steady", "once"):
        with pytest.raises(ApiException) as none:
            log(never_restarted, previous=True)
        assert (none.value.status, status_body(none)) == (400, {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f'previous terminated container "main" in pod "{never_restarted}" not '
                       "found", "reason": "BadRequest", "code": 400})


def test_following_a_log_streams_until_the_container_stops(
        api: KubeApiServer, core: CoreV1Api, controller: KubeController) -> None:
    controller.behave("Pod", "streamer", log="first", run_s=1.0)
    core.create_namespaced_pod("default", pod_manifest("streamer", restart="Never"))
    wait_until(lambda: core.read_namespaced_pod("streamer", "default").status.phase == "Running")
    threading.Timer(0.3, api.store.append_log, ("default", "streamer", "main", "later")).start()

    response = core.read_namespaced_pod_log("streamer", "default", follow=True,
                                            _preload_content=False)
    streamed = b"".join(response.stream()).decode()

    assert streamed == "first\nlater\n"
    assert core.read_namespaced_pod("streamer", "default").status.phase == "Succeeded"


# --- service proxy

@pytest.fixture
def backend() -> Iterator[str]:
    class Echo(BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps({"method": self.command, "path": self.path,
                               "body": body.decode()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def served_by_a_ready_pod(core: CoreV1Api, name: str, ports: list[dict[str, Any]],
                          container_ports: list[dict[str, Any]] | None = None) -> Any:
    """A Service `name` selecting app=<name>, and its pod once the controller made it ready."""
    core.create_namespaced_service("default", {"metadata": {"name": name}, "spec": {
        "selector": {"app": name}, "ports": ports}})
    manifest = pod_manifest(f"{name}-0", labels={"app": name})
    manifest["spec"]["containers"][0]["ports"] = container_ports or []
    core.create_namespaced_pod("default", manifest)
    return wait_until(lambda: (pod := core.read_namespaced_pod(f"{name}-0", "default")) and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []) and pod,
        what=f"{name}-0 ready")


def test_service_proxy_reaches_the_registered_backend(
        api: KubeApiServer, core: CoreV1Api, controller: KubeController, backend: str) -> None:
    served_by_a_ready_pod(core, "model", [{"port": 8080}])
    api.route_service("default", "model", backend)

    response = core.connect_get_namespaced_service_proxy_with_path(
        "http:model:8080", "default", "v1/models/m:predict", _preload_content=False)
    posted = requests.post(f"{api.url}/api/v1/namespaces/default/services/model:8080/proxy/"
                           "invocations?verbose=1", json={"x": 1}, timeout=5)

    assert json.loads(response.data) == {"method": "GET", "path": "/v1/models/m:predict",
                                         "body": ""}
    assert posted.json() == {"method": "POST", "path": "/invocations?verbose=1",
                             "body": '{"x": 1}'}
    assert ("GET", "/api/v1/namespaces/default/services/http:model:8080/proxy/"
                   "v1/models/m:predict") in api.requests


def proxy_refusal(core: CoreV1Api, service_id: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as refused:
        core.connect_get_namespaced_service_proxy_with_path(service_id, "default", "health")
    return refused.value.status, status_body(refused)


def unavailable(message: str) -> dict[str, Any]:
    """NewServiceUnavailable's body: no details."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "ServiceUnavailable", "code": 503}


def test_service_proxy_answers_503_until_a_ready_pod_backs_the_port(
        api: KubeApiServer, core: CoreV1Api, controller: KubeController, backend: str) -> None:
    """As kube-apiserver resolves a proxied Service (kubernetes/kubernetes
    pkg/registry/core/service/storage/storage.go ResourceLocation): a port number the Service
    declares, then an address among the Service's Endpoints (ready pods its selector matches
    that have the port) for that port's name; whatever the backend, until then."""
    api.route_service(None, "model", backend)
    controller.behave("Pod", "model-0", failure="crash-loop")
    core.create_namespaced_service("default", {"metadata": {"name": "model"}, "spec": {
        "selector": {"app": "model"}, "ports": [{"name": "http", "port": 8080}]}})

    no_pods = proxy_refusal(core, "http:model:8080")
    core.create_namespaced_pod("default", pod_manifest("model-0", labels={"app": "model"}))
    wait_until(lambda: "CrashLoopBackOff" in str(core.read_namespaced_pod(
        "model-0", "default").status.container_statuses), what="the pod crash-looping")
    not_ready = proxy_refusal(core, "http:model:8080")
    no_such_port = proxy_refusal(core, "http:model:9090")

    assert no_pods == (503, unavailable('no endpoints available for service "model"'))
    assert not_ready == (503, unavailable('no endpoints available for service '
                                          '"http:model:8080"'))
    assert no_such_port == (503, unavailable('no service port 9090 found for service "model"'))

    served_by_a_ready_pod(core, "ready", [{"name": "http", "port": 8080}])
    core.patch_namespaced_service("model", "default", {"spec": {"selector": {"app": "ready"}}})
    response = core.connect_get_namespaced_service_proxy_with_path(
        "http:model:8080", "default", "health", _preload_content=False)
    assert json.loads(response.data)["path"] == "/health"
    # A port by name must be the name the Service gave it; `http:model` is Service `http`.
    assert proxy_refusal(core, "model:metrics") == (
        503, unavailable('no endpoints available for service "model:metrics"'))
    assert proxy_refusal(core, "http:model")[0] == 404


def test_service_proxy_refusals_name_what_is_missing(
        api: KubeApiServer, core: CoreV1Api, controller: KubeController) -> None:
    served_by_a_ready_pod(core, "model", [{"port": 8080}])
    # a named targetPort no container declares: the pod is no endpoint of that port
    served_by_a_ready_pod(core, "named", [{"port": 80, "targetPort": "http"}],
                          container_ports=[{"name": "grpc", "containerPort": 9000}])
    core.create_namespaced_service("default", {"metadata": {"name": "manual"},
                                               "spec": {"ports": [{"port": 80}]}})
    pod = core.read_namespaced_pod("model-0", "default")

    nothing_listens = proxy_refusal(core, "model:8080")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    api.route_service(None, "model", f"http://127.0.0.1:{closed_port}")
    refused = proxy_refusal(core, "model:8080")

    assert nothing_listens == (503, unavailable(
        f"error trying to reach service: dial tcp {pod.status.pod_ip}:8080: connect: "
        "connection refused"))
    assert refused[0] == 503 and "connection refused" in refused[1]["message"].lower()
    assert proxy_refusal(core, "named:80") == (
        503, unavailable('no endpoints available for service "named"'))
    # no selector: its Endpoints would be written by hand, and the emulator keeps none
    assert proxy_refusal(core, "manual:80") == (404, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'endpoints "manual" not found', "reason": "NotFound",
        "details": {"name": "manual", "kind": "endpoints"}, "code": 404})
    assert proxy_refusal(core, "ghost:80")[1]["message"] == 'services "ghost" not found'
    assert proxy_refusal(core, "ghost")[1]["message"] == 'endpoints "ghost" not found'


# --- faults on request

def test_injected_throttling_answers_as_api_priority_and_fairness_does(
        api: KubeApiServer) -> None:
    """kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/server/filters/maxinflight.go
    tooManyRequests (APF calls it too): Retry-After 1, a plain-text body."""
    throttled = api.inject(429, plain=True)

    answer = requests.get(f"{api.url}/api/v1/namespaces", timeout=5)

    assert answer.status_code == 429
    assert answer.text == "Too many requests, please try again later.\n"
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "X-Kubernetes-PF-FlowSchema-UID" in answer.headers
    assert throttled.answered == 1
    assert requests.get(f"{api.url}/api/v1/namespaces", timeout=5).status_code == 200


STATUS = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}


@pytest.mark.parametrize("status, retry_after, body", [
    (429, 2, {**STATUS, "message": "storage is (re)initializing", "reason": "TooManyRequests",
              "details": {"retryAfterSeconds": 2}, "code": 429}),
    (500, None, {**STATUS, "message": "Internal error occurred: etcdserver: request timed out",
                 "reason": "InternalError", "details": {"causes": [
                     {"message": "etcdserver: request timed out"}]}, "code": 500}),
    (503, None, {**STATUS, "message": "the server is currently unable to handle the request",
                 "reason": "ServiceUnavailable", "code": 503}),
    (504, 3, {**STATUS, "message": "Timeout: request did not complete within requested "
              "timeout - context deadline exceeded", "reason": "Timeout",
              "details": {"retryAfterSeconds": 3}, "code": 504}),
])
def test_injected_errors_answer_the_status_bodies_of_a_real_server(
        api: KubeApiServer, status: int, retry_after: int | None, body: dict[str, Any]) -> None:
    """apimachinery pkg/api/errors: NewTooManyRequests, NewInternalError,
    NewServiceUnavailable, NewTimeoutError; Retry-After from details.retryAfterSeconds
    (apiserver responsewriters ErrorNegotiated). Asked with requests: the official client's
    urllib3 would retry a 429 or 503 carrying Retry-After by itself."""
    api.inject(status, retry_after=retry_after)

    failed = requests.get(f"{api.url}/api/v1/namespaces", timeout=5)

    assert (failed.status_code, failed.json()) == (status, body)
    assert failed.headers.get("Retry-After") == (
        None if retry_after is None else str(retry_after))
    assert requests.get(f"{api.url}/api/v1/namespaces", timeout=5).status_code == 200


def test_faults_match_by_method_and_path_until_cleared(api: KubeApiServer, core: CoreV1Api
                                                       ) -> None:
    storm = api.inject(503, count=None, methods=("POST",), path_regex=r"/configmaps$")

    for attempt in range(3):
        with pytest.raises(ApiException) as refused:
            core.create_namespaced_config_map("default", {"metadata": {"name": f"c{attempt}"}})
        assert refused.value.status == 503
    core.list_namespaced_config_map("default")  # a GET of the same path
    core.create_namespaced_secret("default", {"metadata": {"name": "s"}})  # another path
    api.clear_faults()
    core.create_namespaced_config_map("default", {"metadata": {"name": "after"}})

    assert storm.answered == 3
    assert [c.metadata.name for c in core.list_namespaced_config_map("default").items] == [
        "after"]


def test_an_injected_reset_drops_the_connection_without_an_answer(api: KubeApiServer) -> None:
    api.inject(reset=True, methods=("GET",))

    with pytest.raises(requests.ConnectionError) as dropped:
        requests.get(f"{api.url}/api/v1/namespaces", timeout=5)

    assert "reset" in str(dropped.value).lower() or "aborted" in str(dropped.value).lower()
    assert requests.get(f"{api.url}/api/v1/namespaces", timeout=5).status_code == 200


# --- the controller: healthy workloads

def test_a_healthy_deployment_becomes_available_with_running_ready_pods(
        api: KubeApiServer, client: ApiClient, core: CoreV1Api,
        controller: KubeController) -> None:
    apps = AppsV1Api(client)
    apps.create_namespaced_deployment("default", deployment_manifest("mlflow", replicas=2))

    deployment = wait_until(lambda: (d := apps.read_namespaced_deployment_status(
        "mlflow", "default")).status.available_replicas == 2 and d, what="2 available")

    conditions = {c.type: c for c in deployment.status.conditions}
    assert (conditions["Available"].status, conditions["Available"].reason) == (
        "True", "MinimumReplicasAvailable")
    assert conditions["Progressing"].status == "True"
    assert (deployment.status.replicas, deployment.status.ready_replicas) == (2, 2)
    pods = core.list_namespaced_pod("default", label_selector="app=mlflow").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Running"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
        assert [s.ready for s in pod.status.container_statuses] == [True]
        owner = pod.metadata.owner_references[0]
        assert owner.kind == "ReplicaSet"
        replica_set = apps.read_namespaced_replica_set(owner.name, "default")
        assert replica_set.metadata.owner_references[0].name == "mlflow"
    assert {"Scheduled", "Started"} <= {e.reason for e in events_for(core, pods[0].metadata.name)}


def test_a_statefulset_starts_its_pods_in_order(client: ApiClient, core: CoreV1Api,
                                                controller: KubeController) -> None:
    apps = AppsV1Api(client)
    manifest = deployment_manifest("db", replicas=2)
    manifest["spec"]["serviceName"] = "db"
    apps.create_namespaced_stateful_set("default", manifest)

    wait_until(lambda: apps.read_namespaced_stateful_set("db", "default").status.ready_replicas
               == 2, what="2 ready")

    pods = core.list_namespaced_pod("default", label_selector="app=db").items
    assert [p.metadata.name for p in pods] == ["db-0", "db-1"]
    assert pods[0].status.start_time <= pods[1].status.start_time


def test_a_job_runs_its_pod_to_completion(client: ApiClient, core: CoreV1Api,
                                          controller: KubeController) -> None:
    batch = BatchV1Api(client)
    job = batch.create_namespaced_job("default", job_manifest("etl"))

    done = wait_until(lambda: (j := batch.read_namespaced_job_status("etl", "default")
                               ).status.succeeded and j, what="the job to succeed")

    assert done.status.succeeded == 1 and done.status.completion_time is not None
    assert {c.type: c.status for c in done.status.conditions}["Complete"] == "True"
    [pod] = core.list_namespaced_pod("default", label_selector="job-name=etl").items
    assert pod.metadata.labels["controller-uid"] == job.metadata.uid
    assert pod.metadata.labels["team"] == "ml"
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    log = core.read_namespaced_pod_log(pod.metadata.name, "default", _preload_content=False)
    assert log.data.decode() == "train: starting\ntrain: ready\ntrain: done\n"


def test_a_rayjob_initializes_runs_and_completes_through_its_submitter(
        api: KubeApiServer, client: ApiClient, core: CoreV1Api,
        controller: KubeController) -> None:
    custom = CustomObjectsApi(client)
    start = custom.list_namespaced_custom_object("ray.io", "v1", "default", "rayjobs")
    custom.create_namespaced_custom_object("ray.io", "v1", "default", "rayjobs", {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "train"},
        "spec": {"entrypoint": "python train.py"}})

    seen = watched(custom.list_namespaced_custom_object, "ray.io", "v1", "default", "rayjobs",
                   resource_version=start["metadata"]["resourceVersion"],
                   until=lambda o: o.get("status", {}).get("jobDeploymentStatus") == "Complete")

    states = transitions(seen, lambda s: (s.get("jobDeploymentStatus", ""),
                                          s.get("jobStatus", "")))
    assert states == [("", ""), ("Initializing", ""), ("Running", "PENDING"),
                      ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
    status = seen[-1]["status"]
    cluster = custom.get_namespaced_custom_object("ray.io", "v1", "default", "rayclusters",
                                                  status["rayClusterName"])
    assert cluster["status"]["state"] == "ready"
    assert BatchV1Api(client).read_namespaced_job("train", "default").status.succeeded == 1
    [submitter] = core.list_namespaced_pod("default", label_selector="job-name=train").items
    log = core.read_namespaced_pod_log(submitter.metadata.name, "default",
                                       _preload_content=False).data.decode()
    assert f"Job '{status['jobId']}' succeeded" in log


def test_a_sparkapplication_submits_runs_and_completes(
        client: ApiClient, core: CoreV1Api, controller: KubeController) -> None:
    custom = CustomObjectsApi(client)
    group = ("sparkoperator.k8s.io", "v1beta2", "default", "sparkapplications")
    start = custom.list_namespaced_custom_object(*group)
    custom.create_namespaced_custom_object(*group, {
        "apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
        "metadata": {"name": "pi"}, "spec": {"type": "Python", "image": "spark:3.5.1",
                                             "mainApplicationFile": "local:///opt/pi.py"}})

    seen = watched(custom.list_namespaced_custom_object, *group,
                   resource_version=start["metadata"]["resourceVersion"],
                   until=lambda o: o.get("status", {}).get("applicationState", {}).get(
                       "state") == "COMPLETED")

    states = transitions(seen, lambda s: s.get("applicationState", {}).get("state"))
    assert states == [None, "SUBMITTED", "RUNNING", "SUCCEEDING", "COMPLETED"]
    assert seen[-1]["status"]["driverInfo"]["podName"] == "pi-driver"
    driver = core.read_namespaced_pod("pi-driver", "default")
    assert driver.metadata.labels["spark-role"] == "driver"
    assert driver.metadata.labels["sparkoperator.k8s.io/app-name"] == "pi"
    assert driver.status.phase == "Succeeded"


# --- the controller: failures

def test_crash_looping_pods_restart_and_record_back_off_events(
        client: ApiClient, core: CoreV1Api, controller: KubeController) -> None:
    controller.behave("Deployment", "mlflow", failure=Failure.CRASH_LOOP)
    AppsV1Api(client).create_namespaced_deployment("default", deployment_manifest("mlflow"))

    def restarted_pod() -> Any:
        pods = core.list_namespaced_pod("default", label_selector="app=mlflow").items
        return pods and pods[0].status.container_statuses and \
            pods[0].status.container_statuses[0].restart_count >= 2 and pods[0]
    pod = wait_until(restarted_pod, what="restarts")

    status = pod.status.container_statuses[0]
    assert pod.status.phase == "Running"
    assert status.state.waiting.reason == "CrashLoopBackOff" and not status.ready
    assert status.last_state.terminated.exit_code == 1
    back_off = wait_until(lambda: [e for e in events_for(core, pod.metadata.name)
                                   if e.reason == "BackOff"], what="BackOff")[0]
    assert back_off.type == "Warning" and back_off.last_timestamp is not None
    assert back_off.message.startswith("Back-off restarting failed container mlflow")
    assert back_off.involved_object.kind == "Pod"
    deployment = AppsV1Api(client).read_namespaced_deployment("mlflow", "default")
    assert {c.type: c.status for c in deployment.status.conditions}["Available"] == "False"
    assert deployment.status.available_replicas is None


def test_image_pull_failures_keep_the_pod_pending(
        client: ApiClient, core: CoreV1Api, controller: KubeController) -> None:
    controller.behave("Deployment", "broken", failure="image-pull")
    AppsV1Api(client).create_namespaced_deployment("default", deployment_manifest("broken"))

    def backing_off() -> Any:
        pods = core.list_namespaced_pod("default", label_selector="app=broken").items
        waiting = pods and pods[0].status.container_statuses and \
            pods[0].status.container_statuses[0].state.waiting
        return waiting and waiting.reason == "ImagePullBackOff" and pods[0]
    pod = wait_until(backing_off, what="ImagePullBackOff")

    assert pod.status.phase == "Pending"
    messages = {(e.reason, e.message) for e in events_for(core, pod.metadata.name)}
    assert ("Failed", "Error: ErrImagePull") in messages
    with pytest.raises(ApiException) as waiting_log:
        core.read_namespaced_pod_log(pod.metadata.name, "default")
    assert waiting_log.value.status == 400
    assert "is waiting to start" in status_body(waiting_log)["message"]


def test_unschedulable_pods_never_get_a_node(
        client: ApiClient, core: CoreV1Api, controller: KubeController) -> None:
    controller.behave("Deployment", "huge", failure=Failure.UNSCHEDULABLE)
    AppsV1Api(client).create_namespaced_deployment("default", deployment_manifest("huge"))

    def unscheduled() -> Any:
        pods = core.list_namespaced_pod("default", label_selector="app=huge").items
        return pods and pods[0].status.conditions and pods[0]
    pod = wait_until(unscheduled, what="a scheduling verdict")

    [scheduled] = pod.status.conditions
    assert (scheduled.type, scheduled.status, scheduled.reason) == (
        "PodScheduled", "False", "Unschedulable")
    assert pod.spec.node_name is None and pod.status.phase == "Pending"
    event = wait_until(lambda: events_for(core, pod.metadata.name), what="an event")[0]
    assert (event.reason, event.type, event.source.component) == (
        "FailedScheduling", "Warning", "default-scheduler")


def test_a_stuck_deployment_exceeds_its_progress_deadline(
        client: ApiClient, controller: KubeController) -> None:
    apps = AppsV1Api(client)
    controller.behave("Deployment", "stuck", failure=Failure.PROGRESS_DEADLINE)
    apps.create_namespaced_deployment("default", deployment_manifest("stuck"))

    def deadline_exceeded() -> Any:
        status = apps.read_namespaced_deployment_status("stuck", "default").status
        return next((c for c in status.conditions or [] if c.type == "Progressing"
                     and c.status == "False"), None)
    progressing = wait_until(deadline_exceeded, what="Progressing False")

    assert progressing.reason == "ProgressDeadlineExceeded"
    status = apps.read_namespaced_deployment_status("stuck", "default").status
    assert status.available_replicas is None and status.ready_replicas is None


def test_a_failing_job_exhausts_its_backoff_limit(
        client: ApiClient, core: CoreV1Api, controller: KubeController) -> None:
    batch = BatchV1Api(client)
    controller.behave("Job", "etl", failure=Failure.FAIL, exit_code=3)
    batch.create_namespaced_job("default", job_manifest("etl", backoff_limit=1))

    failed = wait_until(lambda: (j := batch.read_namespaced_job_status("etl", "default")
                                 ).status.conditions and j, what="a job verdict")

    assert failed.status.failed == 2 and not failed.status.succeeded
    condition = {c.type: c for c in failed.status.conditions}["Failed"]
    assert (condition.status, condition.reason) == ("True", "BackoffLimitExceeded")
    pods = core.list_namespaced_pod("default", label_selector="job-name=etl").items
    assert [p.status.phase for p in pods] == ["Failed", "Failed"]
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 3
    log = core.read_namespaced_pod_log(pods[0].metadata.name, "default", _preload_content=False)
    assert "Traceback (most recent call last)" in log.data.decode()


# A native sidecar (Kubernetes 1.29: an init container with restartPolicy Always) that sleeps
# until the kubelet's SIGTERM, then says what it finds in the volume it shares.
WATCHER = ("trap 'echo stopping; cat /shared/*.txt 2>/dev/null || echo nothing; exit 0' TERM; "
           "echo up; while :; do sleep 1 & wait $!; done")


def sidecar_job(name: str, sidecar: dict[str, Any]) -> dict[str, Any]:
    body = job_manifest(name)
    pod = body["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "shared", "emptyDir": {}}]
    pod["initContainers"] = [
        {"name": "setup", "image": "busybox:1.37.0", "command": ["sh", "-c", "true"],
         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        {"name": "watcher", "image": "busybox:1.37.0", "restartPolicy": "Always",
         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}], **sidecar}]
    pod["containers"][0]["volumeMounts"] = [{"name": "shared", "mountPath": "/shared"}]
    return body


def container_states(status: dict[str, Any]) -> tuple[str, ...]:
    """(phase, then each init container's state and each main container's), as a watch sees
    them: `setup:terminated`, `watcher:running`, ..."""
    return (status.get("phase", ""), *(
        f"{s['name']}:{next(iter(s.get('state') or {'none': 0}))}"
        for s in [*status.get("initContainerStatuses", []),
                  *status.get("containerStatuses", [])]))


def test_a_native_sidecar_outlives_the_main_containers_and_is_stopped_after_them(
        api: KubeApiServer, client: ApiClient, core: CoreV1Api,
        controller: KubeController) -> None:
    """As the kubelet runs one (kubernetes.io/docs/concepts/workloads/pods/sidecar-containers):
    regular init containers run to completion, the sidecar starts before the main containers
    and keeps running; once every main container has ended it is stopped (SIGTERM), and only
    then does the pod take its phase, which the main containers alone decide. Its status is in
    initContainerStatuses; its log is read like any container's."""
    controller.behave("Job", "train", failure=Failure.FAIL, run_s=0.3,
                      files={"/shared/result.txt": "accuracy 0.81", "/home/private.txt": "x"})
    BatchV1Api(client).create_namespaced_job("default", sidecar_job("train", {
        "command": ["sh", "-c", WATCHER]}))

    seen = watched(core.list_namespaced_pod, "default", label_selector="job-name=train",
                   until=lambda pod: pod["status"].get("phase") in ("Succeeded", "Failed"))

    states = transitions(seen, container_states)
    assert ("Running", "setup:terminated", "watcher:running", "train:running") in states
    assert states[-2:] == [
        ("Running", "setup:terminated", "watcher:running", "train:terminated"),
        ("Failed", "setup:terminated", "watcher:terminated", "train:terminated")]
    pod = seen[-1]
    [setup, watcher] = pod["status"]["initContainerStatuses"]
    assert (setup["state"]["terminated"]["reason"], watcher["state"]["terminated"]["exitCode"]
            ) == ("Completed", 0)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1

    def log(container: str) -> str:
        return core.read_namespaced_pod_log(pod["metadata"]["name"], "default",
                                            container=container, _preload_content=False
                                            ).data.decode()

    # The script ran for real: it saw what the main container wrote in the shared volume, and
    # nothing of what it wrote elsewhere.
    assert log("watcher") == "up\nstopping\naccuracy 0.81\n"
    assert log("setup") == "setup: starting\nsetup: done\n"
    assert any(e.reason == "Killing" and e.message == "Stopping container watcher"
               for e in events_for(core, pod["metadata"]["name"]))
    pair = pod_manifest("pair", containers=("app", "proxy"))
    pair["spec"]["initContainers"] = [{"name": "setup", "image": "busybox:1.37.0"}]
    core.create_namespaced_pod("default", pair)
    with pytest.raises(ApiException) as ambiguous:
        core.read_namespaced_pod_log("pair", "default")
    assert status_body(ambiguous)["message"] == (
        "a container name must be specified for pod pair, choose one of: [app proxy] or one "
        "of the init containers: [setup]")
    wait_until(lambda: batch_condition(client, "train") == "Failed", what="the job to fail")


def batch_condition(client: ApiClient, name: str) -> str | None:
    conditions = BatchV1Api(client).read_namespaced_job_status(name, "default").status.conditions
    return next((c.type for c in conditions or [] if c.status == "True"
                 and c.type in ("Complete", "Failed")), None)


def test_a_sidecar_that_is_no_shell_script_is_played_and_a_deleted_pod_kills_what_ran(
        api: KubeApiServer, client: ApiClient, core: CoreV1Api,
        controller: KubeController) -> None:
    BatchV1Api(client).create_namespaced_job("default", sidecar_job("proxy", {
        "image": "envoyproxy/envoy:v1.31.0"}))
    pod = {"metadata": {"name": "server"}, "spec": {
        "initContainers": [{"name": "watcher", "image": "busybox:1.37.0",
                            "restartPolicy": "Always", "command": ["sh", "-c", WATCHER]}],
        "containers": [{"name": "main", "image": "python:3.11"}]}}
    core.create_namespaced_pod("default", pod)
    wait_until(lambda: batch_condition(client, "proxy") == "Complete", what="the job")
    [done] = core.list_namespaced_pod("default", label_selector="job-name=proxy").items
    running = wait_until(lambda: controller.containers.running(
        api.store.get(TYPES["Pod"], "default", "server"), "watcher"), what="the sidecar to run")

    assert done.status.phase == "Succeeded"
    assert done.status.init_container_statuses[1].state.terminated.exit_code == 0
    assert core.read_namespaced_pod_log(done.metadata.name, "default", container="watcher",
                                        _preload_content=False).data.decode() == (
        "watcher: starting\nwatcher: ready\n")
    wait_until(lambda: core.read_namespaced_pod_log(
        "server", "default", container="watcher", _preload_content=False).data == b"up\n",
        what="the sidecar's first line")
    core.delete_namespaced_pod("server", "default", grace_period_seconds=0)
    wait_until(lambda: running.process.poll() is not None, what="the sidecar killed")


def test_a_failing_rayjob_reports_app_failed_with_the_driver_traceback(
        api: KubeApiServer, client: ApiClient, core: CoreV1Api,
        controller: KubeController) -> None:
    custom = CustomObjectsApi(client)
    controller.behave("RayJob", "train", failure=Failure.FAIL)
    custom.create_namespaced_custom_object("ray.io", "v1", "default", "rayjobs", {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "train"},
        "spec": {"entrypoint": "python train.py", "shutdownAfterJobFinishes": True}})

    status = wait_until(lambda: (s := custom.get_namespaced_custom_object(
        "ray.io", "v1", "default", "rayjobs", "train").get("status", {})).get(
        "jobDeploymentStatus") == "Failed" and s, what="the rayjob to fail")

    assert (status["jobStatus"], status["reason"]) == ("FAILED", "AppFailed")
    assert "RuntimeError: training diverged" in status["message"]
    [submitter] = core.list_namespaced_pod("default", label_selector="job-name=train").items
    assert submitter.status.phase == "Succeeded"  # `ray job logs --follow` exits 0 anyway
    log = core.read_namespaced_pod_log(submitter.metadata.name, "default",
                                       _preload_content=False).data.decode()
    assert "Traceback (most recent call last)" in log and f"Job '{status['jobId']}' failed" in log
    wait_until(lambda: not api.objects("RayCluster"), what="the cluster shut down")
    assert [j["metadata"]["name"] for j in api.objects("Job")] == ["train"]


def test_a_failing_sparkapplication_ends_failed_with_an_error_message(
        client: ApiClient, core: CoreV1Api, controller: KubeController) -> None:
    custom = CustomObjectsApi(client)
    group = ("sparkoperator.k8s.io", "v1beta2", "default", "sparkapplications")
    controller.behave("SparkApplication", "pi", failure=Failure.FAIL)
    custom.create_namespaced_custom_object(*group, {
        "apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
        "metadata": {"name": "pi"}, "spec": {"image": "spark:3.5.1"}})

    state = wait_until(lambda: (s := custom.get_namespaced_custom_object(*group, "pi").get(
        "status", {}).get("applicationState", {})).get("state") == "FAILED" and s,
        what="the application to fail")

    assert state["errorMessage"] == "driver container failed with ExitCode: 1, Reason: Error"
    assert core.read_namespaced_pod("pi-driver", "default").status.phase == "Failed"


def test_behave_rejects_what_it_cannot_emulate(api: KubeApiServer) -> None:
    controller = KubeController(api)

    with pytest.raises(ValueError, match="not emulated for a RayJob"):
        controller.behave("RayJob", "train", failure=Failure.CRASH_LOOP)
    with pytest.raises(ValueError, match="runs only"):
        controller.behave("ConfigMap", "settings")
    with pytest.raises(ValueError):
        controller.behave("Pod", "p", failure="melts")


# --- authentication and RBAC

UNAUTHORIZED = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[KubeApiServer]:
    """RBAC on, a namespace `x` with a pod that has a log and a routed Service, and the
    ServiceAccount x/runner."""
    with KubeApiServer(rbac=True) as server:
        with kubernetes.config.new_client_from_config(
                config_file=str(server.kubeconfig(tmp_path / "admin"))) as admin:
            core = CoreV1Api(admin)
            core.create_namespace({"metadata": {"name": "x"}})
            core.create_namespaced_service_account("x", {"metadata": {"name": "runner"}})
            core.create_namespaced_pod("x", pod_manifest("p", labels={"app": "web"}))
            core.create_namespaced_service("x", {"metadata": {"name": "web"}, "spec": {
                "selector": {"app": "web"}, "ports": [{"port": 80}]}})
        kubelet = KubeController(server)
        for _ in range(2):  # scheduled, then running and ready
            kubelet.tick()
        server.store.set_log("x", "p", "main", "hello")
        yield server


def client_as(api: KubeApiServer, path: Path, token: str) -> ApiClient:
    return kubernetes.config.new_client_from_config(
        config_file=str(api.kubeconfig(path, token=token)))


def grant(api: KubeApiServer, tmp_path: Path, namespace: str, rules: list[dict[str, Any]],
          subject: dict[str, Any]) -> None:
    """An admin's Role of `rules` in namespace, bound to subject."""
    with kubernetes.config.new_client_from_config(
            config_file=str(api.kubeconfig(tmp_path / "admin"))) as admin:
        rbac = kubernetes.client.RbacAuthorizationV1Api(admin)
        name = f"granted-{len(api.objects('Role'))}"
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": name}, "subjects": [subject],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": name}})


RUNNER = {"kind": "ServiceAccount", "name": "runner", "namespace": "x"}


@pytest.mark.parametrize("path", [
    "/version", "/api", "/apis", "/apis/apps/v1", "/api/v1/namespaces",
    "/api/v1/namespaces/x/pods/p/log", "/api/v1/namespaces/x/services/http:web:80/proxy/",
])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic YWRtaW46YWRtaW4="])
def test_every_path_wants_a_token_the_server_issued(secured: KubeApiServer, backend: str,
                                                    path: str, authorization: str | None
                                                    ) -> None:
    secured.route_service("x", "web", backend)
    headers = {"Authorization": authorization} if authorization else {}

    refused = requests.get(secured.url + path, headers=headers, timeout=5)
    admitted = requests.get(secured.url + path, timeout=5, headers={
        "Authorization": f"bearer {secured.admin_token}"})  # the scheme in any case

    assert (refused.status_code, refused.json()) == (401, UNAUTHORIZED)
    assert admitted.status_code == 200, admitted.text


def test_a_token_kubeconfig_and_its_service_account(secured: KubeApiServer,
                                                    tmp_path: Path) -> None:
    token = secured.service_account_token("x", "runner")
    grant(secured, tmp_path, "x", [{"apiGroups": [""], "resources": ["pods"],
                                    "verbs": ["list"]}], RUNNER)
    config = json.loads(secured.kubeconfig(tmp_path / "runner", token=token).read_text())
    assert config["users"][0]["user"] == {"token": token}

    with client_as(secured, tmp_path / "runner", token) as runner:
        assert [p.metadata.name for p in CoreV1Api(runner).list_namespaced_pod("x").items] == [
            "p"]
        with kubernetes.config.new_client_from_config(
                config_file=str(secured.kubeconfig(tmp_path / "admin"))) as admin:
            CoreV1Api(admin).delete_namespaced_service_account("runner", "x")
        with pytest.raises(ApiException) as gone:
            CoreV1Api(runner).list_namespaced_pod("x")

    assert gone.value.status == 401  # a deleted account's token authenticates no more
    assert {user for user, _, _ in secured.request_log} == {
        "kubernetes-admin", "system:serviceaccount:x:runner"}


def test_rbac_refuses_with_the_body_a_real_server_writes(secured: KubeApiServer,
                                                         tmp_path: Path) -> None:
    grant(secured, tmp_path, "x", [{"apiGroups": [""], "resources": ["pods"],
                                    "verbs": ["get", "list"]}], RUNNER)
    with client_as(secured, tmp_path / "runner",
                   secured.service_account_token("x", "runner")) as runner:
        core = CoreV1Api(runner)
        core.list_namespaced_pod("x")
        DynamicClient(runner)  # discovery: every authenticated user's (system:discovery)
        refusals = []
        for call in (lambda: core.create_namespaced_pod("x", pod_manifest("q")),
                     lambda: core.list_namespaced_pod("default"),
                     lambda: core.read_namespaced_pod_log("p", "x"),
                     lambda: core.connect_get_namespaced_service_proxy_with_path(
                         "http:web:80", "x", "health"),
                     lambda: core.list_namespace(),
                     lambda: list(Watch().stream(core.list_namespaced_pod, "x",
                                                 timeout_seconds=1))):
            with pytest.raises(ApiException) as refused:
                call()
            refusals.append(json.loads(refused.value.body))

    user = 'User "system:serviceaccount:x:runner"'
    assert refusals[0] == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f'pods is forbidden: {user} cannot create resource "pods" in API group "" '
                   'in the namespace "x"',
        "reason": "Forbidden", "details": {"kind": "pods"}, "code": 403}
    assert [r["message"] for r in refusals[1:]] == [
        f'pods is forbidden: {user} cannot list resource "pods" in API group "" in the '
        'namespace "default"',
        f'pods "p" is forbidden: {user} cannot get resource "pods/log" in API group "" in the '
        'namespace "x"',
        f'services "http:web:80" is forbidden: {user} cannot get resource "services/proxy" in '
        'API group "" in the namespace "x"',
        f'namespaces is forbidden: {user} cannot list resource "namespaces" in API group "" at '
        'the cluster scope',
        f'pods is forbidden: {user} cannot watch resource "pods" in API group "" in the '
        'namespace "x"']


def test_rbac_lets_a_role_grant_only_what_its_author_holds(secured: KubeApiServer,
                                                           tmp_path: Path) -> None:
    """The example's spark-rbac.yaml, by an account that may create Roles and RoleBindings
    and holds pods but not configmaps; then with `escalate`, then `bind`."""
    grant(secured, tmp_path, "x", [
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
         "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}], RUNNER)
    driver_role = {"metadata": {"name": "spark-driver"}, "rules": [
        {"apiGroups": [""], "resources": ["pods", "configmaps"], "verbs": ["create", "get"]}]}
    driver_binding = {"metadata": {"name": "spark-driver"},
                      "subjects": [{"kind": "ServiceAccount", "name": "spark"}],
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "spark-driver"}}
    with client_as(secured, tmp_path / "runner",
                   secured.service_account_token("x", "runner")) as runner:
        rbac = kubernetes.client.RbacAuthorizationV1Api(runner)
        with pytest.raises(ApiException) as escalation:
            rbac.create_namespaced_role("x", driver_role)
        grant(secured, tmp_path, "x", [{"apiGroups": ["rbac.authorization.k8s.io"],
                                        "resources": ["roles"], "verbs": ["escalate"]}], RUNNER)
        rbac.create_namespaced_role("x", driver_role)
        with pytest.raises(ApiException) as binding:
            rbac.create_namespaced_role_binding("x", driver_binding)
        grant(secured, tmp_path, "x", [{"apiGroups": ["rbac.authorization.k8s.io"],
                                        "resources": ["roles"], "verbs": ["bind"],
                                        "resourceNames": ["spark-driver"]}], RUNNER)
        rbac.create_namespaced_role_binding("x", driver_binding)

    held = '["system:serviceaccounts" "system:serviceaccounts:x" "system:authenticated"]'
    assert escalation.value.status == 403
    assert json.loads(escalation.value.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'roles.rbac.authorization.k8s.io "spark-driver" is forbidden: user '
                   f'"system:serviceaccount:x:runner" (groups={held}) is attempting to grant '
                   'RBAC permissions not currently held:\n{APIGroups:[""], '
                   'Resources:["configmaps"], Verbs:["create" "get"]}',
        "reason": "Forbidden", "details": {"name": "spark-driver",
                                           "group": "rbac.authorization.k8s.io",
                                           "kind": "roles"}, "code": 403}
    assert binding.value.status == 403
    assert "rolebindings.rbac.authorization.k8s.io \"spark-driver\" is forbidden" in \
        json.loads(binding.value.body)["message"]
    assert [r["metadata"]["name"] for r in secured.objects("RoleBinding", "x")
            if r["metadata"]["name"] == "spark-driver"] == ["spark-driver"]


def test_an_exec_plugin_kubeconfig_hands_the_client_its_token(secured: KubeApiServer,
                                                              tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(secured.issue_token("ci", ["system:masters"]))
    plugin = write_exec_plugin(tmp_path / "get-token", token_file)
    config = secured.kubeconfig(tmp_path / "exec", exec_command=plugin)

    with kubernetes.config.new_client_from_config(config_file=str(config)) as client:
        names = [n.metadata.name for n in CoreV1Api(client).list_namespace().items]

    assert "x" in names
    assert json.loads(config.read_text())["users"][0]["user"]["exec"]["command"] == plugin[0]
    assert secured.request_log[-1][0] == "ci"
