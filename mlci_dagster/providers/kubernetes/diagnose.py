"""Why a Kubernetes object is not ready, in words and as a failure kind: pure functions over the
objects, pods, events and namespaces the API returns (camelCase dicts, as on the wire).

The failure kind says whose fault it most likely is: `product` when a container crashed or a Job
failed (the product's own verdict), `infra` when a pod cannot be scheduled or its image pulled
(the cluster or the registry's image is at fault), `timeout` when nothing explains the wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mlci_dagster.common import dotted
from mlci_dagster.vocabulary import FailureKind

# The condition that means ready, per kind, unless a check names another; anything else: Ready.
DEFAULT_CONDITIONS = {"Deployment": "Available", "Job": "Complete", "Pod": "Ready"}
# Container waiting reasons, by whose fault they are.
INFRA_WAITING = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                 "CreateContainerConfigError", "CreateContainerError", "ContainerCreating"}
PRODUCT_WAITING = {"CrashLoopBackOff", "RunContainerError"}
INFRA_EVENTS = {"FailedScheduling", "FailedMount", "FailedAttachVolume", "FailedCreate",
                "FailedCreatePodSandBox", "ErrImageNeverPull", "InspectFailed"}
# Namespace conditions that explain a namespace stuck in Terminating (True = a problem).
NAMESPACE_PROBLEMS = ("NamespaceFinalizersRemaining", "NamespaceContentRemaining",
                      "NamespaceDeletionContentFailure", "NamespaceDeletionDiscoveryFailure",
                      "NamespaceDeletionGroupVersionParsingFailure")
EVENTS_SHOWN = 12
PROBLEM_CHARS = 160  # a problem in a report's first line


@dataclass(frozen=True)
class Readiness:
    """One look at one object: ready, still waiting, or failed for good (`failed` says whose
    fault it is then), and why."""

    ready: bool
    why: str = ""
    failed: FailureKind | None = None

    @property
    def terminal(self) -> bool:
        return self.failed is not None


def dig(obj: Any, path: str, default: Any = None) -> Any:
    """The value at a dotted path (`status.jobStatus`) of an object: a field an object has not
    set yet is usual, so `default` (None) rather than an error."""
    return dotted.dig(obj, path, default)


def condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The `status.conditions` entry of type `kind`, if any."""
    for entry in dig(obj, "status.conditions") or []:
        if entry.get("type") == kind:
            return entry
    return None


def _condition_text(entry: Mapping[str, Any] | None, kind: str) -> str:
    if entry is None:
        return f"no {kind} condition yet"
    text = f"{kind}={entry.get('status')}"
    if entry.get("reason"):
        text += f" ({entry['reason']})"
    if entry.get("message"):
        text += f": {entry['message']}"
    return text


def _is_true(entry: Mapping[str, Any] | None) -> bool:
    return entry is not None and entry.get("status") == "True"


def readiness(kind: str, obj: Mapping[str, Any] | None, wanted: str | None = None) -> Readiness:
    """Whether `obj` (of `kind`) is ready: its condition `wanted` (default per kind) is True; a
    StatefulSet with no condition named, when its ready replicas reach its replicas."""
    if obj is None:
        return Readiness(False, "not found")
    name = wanted or DEFAULT_CONDITIONS.get(kind, "Ready")
    if kind == "StatefulSet" and wanted is None:
        want = dig(obj, "spec.replicas", 1)
        have = dig(obj, "status.readyReplicas", 0) or 0
        return Readiness(have >= want, f"{have}/{want} replicas ready")
    entry = condition(obj, name)
    if _is_true(entry):
        return Readiness(True, _condition_text(entry, name))
    if kind == "Job" and _is_true(failed := condition(obj, "Failed")):
        return Readiness(False, _condition_text(failed, "Failed"), FailureKind.PRODUCT)
    if kind == "Deployment":
        progressing = condition(obj, "Progressing")
        available = dig(obj, "status.availableReplicas") or 0  # omitted at 0
        replicas = f"{available}/{dig(obj, 'spec.replicas', 1)} replicas available"
        if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
            # The Deployment's own deadline: its pods say whose fault it is, if anything does.
            return Readiness(False, f"{_condition_text(progressing, 'Progressing')}; {replicas}",
                             FailureKind.TIMEOUT)
        return Readiness(False, f"{_condition_text(entry, name)}; {replicas}")
    if kind == "Pod":
        phase = dig(obj, "status.phase", "Unknown")
        if phase in ("Failed", "Succeeded"):
            # A pod that ran to its end will never serve: the product's doing either way.
            return Readiness(False, f"pod ended {phase}, never {name}", FailureKind.PRODUCT)
        return Readiness(False, f"phase {phase}; {_condition_text(entry, name)}")
    return Readiness(False, _condition_text(entry, name))


def service_selector(service: Mapping[str, Any] | None) -> str | None:
    """A Service's selector as a label selector (None: it has none, its endpoints are written
    by hand)."""
    selector = dig(service, "spec.selector") if service else None
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) if selector else None


def _serves(pod: Mapping[str, Any], port: Mapping[str, Any], publish_not_ready: bool) -> bool:
    """Whether the pod is a ready endpoint of the Service port, as the endpoints controller
    counts them (kubernetes/kubernetes pkg/controller/endpoint: an IP, not terminating nor
    ended, Ready, and a named targetPort among its containers' ports)."""
    phase = dig(pod, "status.phase")
    ended = {"Never": ("Failed", "Succeeded"), "OnFailure": ("Succeeded",)}.get(
        dig(pod, "spec.restartPolicy", "Always"), ())
    if not dig(pod, "status.podIP") or phase in ended or (
            dig(pod, "metadata.deletionTimestamp") and not publish_not_ready):
        return False
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, str) and target not in {
            p.get("name") for c in dig(pod, "spec.containers") or [] for p in c.get("ports") or []}:
        return False
    return publish_not_ready or (_is_true(condition(pod, "Ready"))
                                 and not dig(pod, "metadata.deletionTimestamp"))


def service_readiness(service: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]],
                      port: int | str) -> Readiness:
    """Whether the API server's service proxy reaches `port` (a number or a port name) of the
    Service now: the Service declares it and a ready pod its selector matched backs it. A
    Service without a selector has its endpoints written by hand, which this cannot see: it is
    taken as ready. No such port is the config's mistake, for good."""
    if service is None:
        return Readiness(False, "not found")
    ports = dig(service, "spec.ports") or []
    match = next((p for p in ports if p.get("port") == port or (
        isinstance(port, str) and p.get("name") == port)), None)
    if match is None:
        declared = ", ".join(str(p.get("name") or p.get("port")) for p in ports) or "none"
        return Readiness(False, f"the Service has no port {port} (its ports: {declared})",
                         FailureKind.CONFIG)
    selector = service_selector(service)
    if selector is None:
        return Readiness(True, "no selector: its endpoints are written by hand, unseen here")
    pods = list(pods)
    publish = bool(dig(service, "spec.publishNotReadyAddresses"))
    ready = sum(_serves(pod, match, publish) for pod in pods)
    if not pods:
        return Readiness(False, f"no pods match its selector {selector}")
    return Readiness(ready > 0, f"{ready}/{len(pods)} pods ({selector}) ready behind it")


def pod_selector(kind: str, obj: Mapping[str, Any] | None, name: str) -> str | None:
    """The label selector of the pods behind an object (None if it has no pods we can name)."""
    labels = dig(obj, "spec.selector.matchLabels") if obj else None
    if kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet") and labels:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    if kind == "Job":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) if labels \
            else f"job-name={name}"
    return None


# --- pods ------------------------------------------------------------------------------------


def _container_statuses(pod: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    status = pod.get("status") or {}
    return ([("init container", s) for s in status.get("initContainerStatuses") or []]
            + [("container", s) for s in status.get("containerStatuses") or []])


def _terminated_text(terminated: Mapping[str, Any]) -> str:
    text = f"exit {terminated.get('exitCode')}"
    if terminated.get("reason"):
        text += f" ({terminated['reason']})"
    if terminated.get("message"):
        text += f": {terminated['message'].strip()[:300]}"
    return text


def describe_pod(pod: Mapping[str, Any]) -> str:
    """One pod in a few lines: phase, unschedulable, each container's state and restarts."""
    name = dig(pod, "metadata.name", "?")
    lines = [f"pod {name} ({dig(pod, 'status.phase', 'Unknown')})"]
    scheduled = condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        lines.append(f"  not scheduled: {_condition_text(scheduled, 'PodScheduled')}")
    for label, status in _container_statuses(pod):
        state = status.get("state") or {}
        text = f"  {label} {status.get('name')}: "
        if "waiting" in state:
            waiting = state["waiting"] or {}
            text += f"waiting {waiting.get('reason', '')}"
            if waiting.get("message"):
                text += f": {waiting['message'].strip()[:300]}"
        elif "terminated" in state:
            text += f"terminated {_terminated_text(state['terminated'] or {})}"
        elif "running" in state:
            text += "running" + ("" if status.get("ready") else ", not ready")
        else:
            text += "no state yet"
        if status.get("restartCount"):
            text += f"; restarts {status['restartCount']}"
        last = dig(status, "lastState.terminated")
        if last:
            text += f"; last {_terminated_text(last)}"
        lines.append(text)
    return "\n".join(lines)


def pod_problems(pod: Mapping[str, Any]) -> list[tuple[FailureKind, str]]:
    """What is wrong with a pod, each with whose fault it is."""
    return [(kind, text) for kind, _, text in _problems(pod)]


def crashed_containers(pod: Mapping[str, Any]) -> list[str]:
    """The containers of a pod that crashed (their logs say why)."""
    return list(dict.fromkeys(c for kind, c, _ in _problems(pod)
                              if kind is FailureKind.PRODUCT and c))


def _problems(pod: Mapping[str, Any]) -> list[tuple[FailureKind, str, str]]:
    """(whose fault, container or "", what) for everything wrong with a pod."""
    name = dig(pod, "metadata.name", "?")
    problems: list[tuple[FailureKind, str, str]] = []
    scheduled = condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        problems.append((FailureKind.INFRA, "", f"pod {name} unschedulable: "
                                                f"{scheduled.get('message', '')}".rstrip(": ")))
    for _, status in _container_statuses(pod):
        container = status.get("name")
        waiting = dig(status, "state.waiting.reason")
        terminated = dig(status, "state.terminated")
        where = f"pod {name} container {container}"
        if waiting in PRODUCT_WAITING:
            problems.append((FailureKind.PRODUCT, container, f"{where}: {waiting}"))
        elif waiting in INFRA_WAITING and waiting != "ContainerCreating":
            problems.append((FailureKind.INFRA, container, f"{where}: {waiting}"))
        elif terminated and terminated.get("exitCode", 0) != 0:
            problems.append((FailureKind.PRODUCT, container,
                             f"{where}: {_terminated_text(terminated)}"))
        elif dig(status, "lastState.terminated.exitCode", 0) != 0 and not status.get("ready"):
            problems.append((FailureKind.PRODUCT, container, f"{where} crashed: "
                             f"{_terminated_text(dig(status, 'lastState.terminated'))}"))
    return problems


# --- events ----------------------------------------------------------------------------------


def _event_time(event: Mapping[str, Any]) -> str:
    return (event.get("lastTimestamp") or event.get("eventTime")
            or dig(event, "metadata.creationTimestamp") or "")


def recent_events(events: Iterable[Mapping[str, Any]], limit: int = EVENTS_SHOWN
                  ) -> list[Mapping[str, Any]]:
    """The latest `limit` warnings, oldest first; the latest normal events only when nothing
    warned (they are the context then, and noise otherwise)."""
    ordered = sorted(events, key=_event_time)
    warnings = [e for e in ordered if e.get("type") == "Warning"]
    return (warnings or ordered)[-limit:]


def describe_event(event: Mapping[str, Any]) -> str:
    involved = event.get("involvedObject") or event.get("regarding") or {}
    text = (f"{event.get('type', 'Normal')} {event.get('reason', '')} "
            f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '?')}: "
            f"{str(event.get('message') or event.get('note') or '').strip()}")
    count = event.get("count") or dig(event, "series.count")
    return f"{text} (x{count})" if count and count > 1 else text


def event_kind(event: Mapping[str, Any]) -> FailureKind | None:
    """Whose fault a warning event points at, if it points anywhere."""
    if event.get("type") != "Warning":
        return None
    reason = event.get("reason", "")
    message = str(event.get("message") or "")
    if reason in INFRA_EVENTS or "ImagePull" in message or "pull image" in message \
            or "pulling image" in message:
        return FailureKind.INFRA
    if reason == "BackOff" and "restarting failed container" in message:
        return FailureKind.PRODUCT
    if reason in ("BackoffLimitExceeded", "CrashLoopBackOff"):
        return FailureKind.PRODUCT
    if reason == "Failed" and ("ErrImage" in message or "image" in message.lower()):
        return FailureKind.INFRA
    return None


# --- the verdict -----------------------------------------------------------------------------


def failure_kind(states: Iterable[Readiness], pods: Iterable[Mapping[str, Any]],
                 events: Iterable[Mapping[str, Any]]) -> FailureKind:
    """`config` if the test's own manifests can never be ready (a Service without the port it
    names); else `product` if anything crashed or failed for good; else `infra` if scheduling
    or an image is at fault; else `timeout`. A crash is evidence about the product even when
    another pod waits for the cluster, so it wins."""
    kinds = [kind for pod in pods for kind, _ in pod_problems(pod)]
    kinds += [k for event in events if (k := event_kind(event)) is not None]
    kinds += [s.failed for s in states if s.failed is not None]
    for kind in (FailureKind.CONFIG, FailureKind.PRODUCT, FailureKind.INFRA):
        if kind in kinds:
            return kind
    return FailureKind.TIMEOUT


def not_ready_report(namespace: str, not_ready: Iterable[tuple[str, Readiness,
                                                               list[Mapping[str, Any]]]],
                     events: Iterable[Mapping[str, Any]], elapsed_s: float,
                     crash_output: str = "") -> str:
    """The text of the SandboxError a failed readiness wait raises. Its first line names what
    is not ready and the gist of why; each object's state and its pods' follow, then what a
    crashed container printed last; the namespace's recent warnings end it, where a summary
    that keeps the head and the tail finds them."""
    not_ready = list(not_ready)
    # A Service waiting on pods an object named beside it waits on too says nothing new: the
    # first line (all a summary may keep) names the object alone.
    covered = {dig(pod, "metadata.name") for label, _, pods in not_ready
               if not label.startswith("Service ") for pod in pods}
    named = [label for label, _, pods in not_ready if not (
        label.startswith("Service ") and pods and {dig(p, "metadata.name") for p in pods}
        <= covered)]
    gist = list(dict.fromkeys(
        [s.why for _, s, _ in not_ready if s.terminal]
        + [text[:PROBLEM_CHARS] for _, _, pods in not_ready for pod in pods
           for _, text in pod_problems(pod)]))
    head = f"{', '.join(named)} not ready in namespace {namespace} after {elapsed_s:.1f}s"
    lines = [head + (f": {'; '.join(gist[:3])}" if gist else "")]
    for label, state, pods in not_ready:
        lines.append(f"{label}: {state.why or 'not ready'}")
        lines += [describe_pod(pod) for pod in pods]
        if not pods and state.why != "not found":
            lines.append("  (no pods)")
    if crash_output:
        lines.append(crash_output.strip("\n"))
    shown = recent_events(events)
    warned = any(e.get("type") == "Warning" for e in shown)
    lines.append(f"recent {'warnings' if warned else 'events'} in namespace {namespace}:"
                 if shown else f"no events in namespace {namespace}")
    lines += [f"  {describe_event(e)}" for e in shown]
    return "\n".join(lines)


def namespace_blockers(namespace: Mapping[str, Any]) -> str:
    """Why a namespace is still there: its phase, finalizers and the conditions the namespace
    controller sets while content or finalizers remain."""
    name = dig(namespace, "metadata.name", "?")
    parts = [f"namespace {name} is {dig(namespace, 'status.phase', 'Active')}"]
    finalizers = [*(dig(namespace, "spec.finalizers") or []),
                  *(dig(namespace, "metadata.finalizers") or [])]
    if finalizers:
        parts.append(f"finalizers: {', '.join(finalizers)}")
    for entry in dig(namespace, "status.conditions") or []:
        if entry.get("type") in NAMESPACE_PROBLEMS and entry.get("status") == "True":
            parts.append(f"{entry['type']}: {entry.get('message') or entry.get('reason', '')}")
    return "; ".join(parts)
