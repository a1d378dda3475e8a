"""The Kubernetes provider: pure rules (readiness, diagnosis, names) by tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlci_dagster.providers.kubernetes import diagnose
from mlci_dagster.providers.kubernetes.provider import (
    ManifestError,
    label_value,
    load_manifest,
    namespace_name,
)
from mlci_dagster.vocabulary import FailureKind

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


def test_describe_pod_names_container_states_restarts_and_last_exit():
    text = diagnose.describe_pod(CRASHING)
    assert "pod web-1 (Running)" in text
    assert "container app: waiting CrashLoopBackOff" in text
    assert "restarts 4" in text and "last exit 1 (Error)" in text
    assert "not scheduled: PodScheduled=False (Unschedulable): 0/1 nodes" in \
        diagnose.describe_pod(UNSCHEDULABLE)


def test_not_ready_report_names_objects_pods_and_recent_warnings_first():
    events = [event("Scheduled", "ok", kind="Normal", at=f"2026-01-01T00:00:0{i}Z")
              for i in range(5)]
    events.append(event("BackOff", "Back-off restarting failed container app",
                        at="2026-01-01T00:00:00Z"))
    report = diagnose.not_ready_report(
        "ns1", [("Deployment web", diagnose.Readiness(False, "Available=False"), [CRASHING]),
                ("Job init", diagnose.Readiness(False, "not found"), [])], events)
    lines = report.splitlines()
    assert lines[0] == "Deployment web: Available=False"
    assert "CrashLoopBackOff" in report and "Job init: not found" in report
    assert "recent events in namespace ns1:" in lines
    first_event = lines[lines.index("recent events in namespace ns1:") + 1]
    assert "Warning BackOff pod/web-1: Back-off restarting failed container app" in first_event


def test_recent_events_keeps_the_latest():
    events = [event("FailedScheduling", f"try {i}", at=f"2026-01-01T00:00:{i:02d}Z")
              for i in range(30)]
    kept = diagnose.recent_events(events, limit=3)
    assert [e["message"] for e in kept] == ["try 27", "try 28", "try 29"]


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
