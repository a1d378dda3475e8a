"""The Kubernetes provider: a namespace per sandbox, holding the registry's templated manifests,
checked ready on their conditions (and each service the stages reach, on a ready pod behind its
port); pipelines as Jobs or custom resources polled to a terminal state, a Job's test reports
handed over by a sidecar through the API server (reports.py); services reached through the API
server's service proxy.

The namespace is the sandbox: labelled with the run, the partition and the expiry, the whole
handle in an annotation, so the janitor finds and reaps it from the cluster alone when the local
ledger is lost. Destroy deletes the namespace (and any cluster-scoped object the manifests made)
and waits until the API server says it is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.common.templating import TemplateError, render, unset_env_references
from mlci_dagster.providers import host
from mlci_dagster.providers.base import PipelineResult, ReportError
from mlci_dagster.providers.handle import (
    DestroyReport,
    SandboxError,
    SandboxHandle,
    render_context,
)
from mlci_dagster.providers.kubernetes import diagnose
from mlci_dagster.providers.kubernetes.client import (
    ClusterAccess,
    KubeClient,
    KubeError,
    RetryPolicy,
    resolve_access,
)
from mlci_dagster.providers.kubernetes.cluster import (
    ClusterError,
    CreatedCluster,
    cluster_name,
    create_cluster,
    delete_cluster,
)
from mlci_dagster.providers.kubernetes.manifests import (
    ManifestError,
    load_manifest,
    object_ref,
)
from mlci_dagster.providers.kubernetes.pipelines import REPORT_JOBS, Edit, PipelineRun
from mlci_dagster.providers.kubernetes.reports import SIDECAR, fetch_reports
from mlci_dagster.providers.logpipe import OutputWatcher
from mlci_dagster.providers.processes import (
    GroupResult,
)
from mlci_dagster.registry.kubernetes import (
    ClusterSpec,
    K8sJobPipeline,
    K8sResourcePipeline,
    KubernetesSandbox,
    SecretSpec,
    ServicePort,
)
from mlci_dagster.vocabulary import FailureKind

MANAGED_BY = ("app.kubernetes.io/managed-by", "mlci")
RUN_LABEL = "mlci.dev/run-id"
PARTITION_LABEL = "mlci.dev/partition"
EXPIRES_LABEL = "mlci.dev/expires-at"
HANDLE_ANNOTATION = "mlci.dev/handle"
DEFAULT_API_VERSIONS = {"Pod": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1",
                        "Job": "batch/v1"}
CHECKED_BY_DEFAULT = ("Deployment", "StatefulSet", "Job")
MAX_LABEL = 63
CRASH_LOGS_QUOTED = 2  # crashed containers whose last lines a readiness error quotes
CRASH_LOG_LINES = 20
LIST_TIMEOUT_S = 10.0  # list_live asks the cluster with a short timeout: the janitor must move on


def namespace_name(config: str, engine: str, suffix: str) -> str:
    """`<config>-<engine>-<suffix>`, a DNS-1123 label of at most 63 characters: the config part
    is cut first, the engine part only beyond 20 characters."""
    engine = re.sub(r"[^a-z0-9-]", "-", engine.lower())[:20].strip("-")
    room = MAX_LABEL - len(suffix) - len(engine) - 2
    config = re.sub(r"[^a-z0-9-]", "-", config.lower())[:max(room, 0)].strip("-")
    return "-".join(part for part in (config, engine, suffix) if part)


def label_value(text: str) -> str:
    """`text` as a label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends; a
    longer text keeps its start and a hash of the whole, so values stay distinct."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", text)
    if len(value) > MAX_LABEL:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        value = f"{value[:MAX_LABEL - 9]}-{digest}"
    return value.strip("-._")


def proxy_url(server: str, namespace: str, service: ServicePort) -> str:
    """The API server's proxy to a Service port; routes append their own path."""
    return (f"{server}/api/v1/namespaces/{namespace}/services/"
            f"{service.scheme}:{service.service}:{service.port}/proxy")


@dataclass
class ReadyTarget:
    """One object (or set of pods) the readiness wait looks at, with its own deadline; for a
    Service, the port the stages reach it on."""

    kind: str
    api_version: str
    name: str | None
    selector: str | None
    condition: str | None
    deadline: float
    port: int | str | None = None

    @property
    def label(self) -> str:
        if self.port is not None:
            return f"{self.kind} {self.name} port {self.port}"
        return f"{self.kind} {self.name}" if self.name else f"{self.kind}s ({self.selector})"


class KubernetesProvider(host.ProviderHome):
    name = "kubernetes"

    def __init__(self, home: str | Path, secret_names: list[str] | tuple[str, ...] = (),
                 root: Path | None = None, settings: ClusterSpec | None = None,
                 poll_interval_s: float = 1.0, *, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """retry: how every API call is sent again (client.RetryPolicy); sleep and clock: the
        time the readiness wait and destroy poll by (injected, so tests need not wait)."""
        super().__init__(home, secret_names, root)
        self.settings = settings or ClusterSpec()
        self.poll_interval_s = poll_interval_s
        self.retry = retry or RetryPolicy()
        self.sleep, self.clock = sleep, clock
        self._clients: dict[ClusterAccess, KubeClient] = {}

    @staticmethod
    def settings_of(spec: KubernetesSandbox) -> ClusterSpec:
        """One provider per cluster the registry names."""
        return spec.cluster

    # --- reaching the cluster ----------------------------------------------------------

    def _default_access(self) -> ClusterAccess:
        return resolve_access(self.settings.kubeconfig, self.settings.context, self.root)

    def _client(self, access: ClusterAccess) -> KubeClient:
        if access not in self._clients:
            self._clients[access] = KubeClient(access, cache_dir=self.home / "kube-discovery",
                                               retry=self.retry)
        return self._clients[access]

    def _client_for(self, handle: SandboxHandle) -> KubeClient:
        if "access" not in handle.state:
            raise KubeError(f"sandbox {handle.sandbox_id}: its handle does not say which "
                            "cluster holds it")
        return self._client(ClusterAccess.from_dict(handle.state["access"]))

    def _labels(self, handle: SandboxHandle) -> dict[str, str]:
        return {MANAGED_BY[0]: MANAGED_BY[1], RUN_LABEL: label_value(handle.run_id),
                PARTITION_LABEL: label_value(f"{handle.config}.{handle.engine}"),
                EXPIRES_LABEL: str(int(handle.expires_at))}

    def _record(self, handle: SandboxHandle) -> None:
        self.ledger.record(handle)

    # --- lifecycle -----------------------------------------------------------------------

    def create(self, spec: KubernetesSandbox, *, config: str, engine: str, run_id: str,
               engine_variables: dict[str, str], teardown_s: float,
               image: dict[str, Any] | None = None) -> SandboxHandle:
        """Creates the namespace, its secrets and its manifests in order; on any failure deletes
        what it made and raises SandboxError (infra) naming the call and why."""
        suffix = uuid.uuid4().hex[:8]
        namespace = namespace_name(config, engine, suffix)
        handle = self.new_handle(namespace, config=config, engine=engine, run_id=run_id,
                                 ttl_s=spec.ttl_s,
                                 state={"namespace": namespace, "objects": []})
        settings = spec.cluster
        if settings.create:
            assert settings.name is not None  # the registry requires it with create
            created = CreatedCluster(settings.create, cluster_name(settings.name, suffix),
                                     str(self.home / "clusters" / f"{namespace}.kubeconfig"))
            handle.state["cluster"] = created.to_dict()
            handle.state["access"] = ClusterAccess(created.kubeconfig).to_dict()
        else:
            try:
                access = resolve_access(settings.kubeconfig, settings.context, self.root)
            except KubeError as exc:  # nothing exists yet: nothing to clean
                raise SandboxError(f"sandbox {namespace} could not be created: {exc}",
                                   "infra") from exc
            handle.state["access"] = access.to_dict()
        self._record(handle)  # before anything exists that could leak
        try:
            Path(handle.workdir).mkdir(parents=True)
            Path(handle.log_dir).mkdir(parents=True, exist_ok=True)
            if settings.create:
                create_cluster(CreatedCluster.from_dict(handle.state["cluster"]),
                               redactor=self.redactor)
            client = self._client_for(handle)
            handle.endpoints = {s.name: proxy_url(client.server, namespace, s)
                                for s in spec.services}
            context = render_context(handle, {}, image=image or {})
            handle.variables = render(engine_variables, context, keep=frozenset({"env"}))
            self._record(handle)
            client.create_namespace(namespace, self._labels(handle),
                                    {HANDLE_ANNOTATION: json.dumps(handle.to_dict())})
            context = render_context(handle, dict(os.environ), image=image or {})
            for secret in spec.secrets:
                self._create_secret(client, handle, secret, context)
            for manifest in spec.manifests:
                self._apply(client, handle, manifest, context)
            client.annotate_namespace(namespace, {HANDLE_ANNOTATION: json.dumps(handle.to_dict())})
        except (KubeError, ClusterError, ManifestError, TemplateError, OSError) as exc:
            # Its manifests and references are the test's own; the cluster's answers are not.
            raise host.create_failed(self, handle, namespace, exc, teardown_s,
                                     own=isinstance(exc, ManifestError | TemplateError)) from exc
        return handle

    def _create_secret(self, client: KubeClient, handle: SandboxHandle, secret: SecretSpec,
                       context: dict[str, Any]) -> None:
        """A Secret from `${env.NAME}` values: rendered here, sent once, never kept."""
        for key, value in secret.data.items():
            if unset := unset_env_references(value):
                raise ManifestError(f"secret '{secret.name}' key '{key}': environment "
                                    f"variable {unset[0]} is not set")
        try:
            data = render(dict(secret.data), context)
        except TemplateError as exc:
            raise ManifestError(f"secret '{secret.name}': {exc}") from exc
        client.create_secret(handle.sandbox_id, secret.name, data,
                             {MANAGED_BY[0]: MANAGED_BY[1]})
        handle.state.setdefault("secrets", []).append(secret.name)

    def _rendered(self, manifest: str, context: dict[str, Any]) -> list[dict[str, Any]]:
        if self.root is None:
            raise ManifestError(f"{manifest}: the registry root is unknown, so the file cannot "
                                "be found")
        documents = load_manifest(self.root / manifest)
        rendered = []
        for index, document in enumerate(documents, start=1):
            if unset := unset_env_references(document):
                raise ManifestError(f"{manifest}: document {index}: environment variable "
                                    f"{unset[0]} is not set")
            try:
                rendered.append(render(document, context))
            except TemplateError as exc:
                raise ManifestError(f"{manifest}: document {index}: {exc}") from exc
        return rendered

    def _apply(self, client: KubeClient, handle: SandboxHandle, manifest: str,
               context: dict[str, Any], edit: Edit | None = None) -> list[dict[str, Any]]:
        """Creates each document of `manifest` in order, as `edit` returns it (if given); every
        object is in the handle (and the ledger) as soon as it exists. Returns the created
        objects."""
        created = []
        for index, document in enumerate(self._rendered(manifest, context), start=1):
            source = f"{manifest}#{index}"
            if edit is not None:
                try:
                    document = edit(document)
                except ManifestError as exc:
                    raise ManifestError(f"{source}: {exc}") from exc
            try:
                obj, namespaced = client.create(document, handle.sandbox_id)
            except KubeError as exc:
                hint = ""
                if exc.status == 409 and not client.resource(document["apiVersion"],
                                                             document["kind"]).namespaced:
                    # Another sandbox (or someone) owns it: not ours to use, nor to delete.
                    hint = (" (a cluster-scoped object is shared by every sandbox on the "
                            "cluster: name it per sandbox, with ${sandbox.id})")
                raise KubeError(f"{source}: {exc}{hint}", exc.status) from exc
            handle.state["objects"].append(object_ref(obj, namespaced, source))
            self._record(handle)
            created.append(obj)
        return created

    # --- readiness -----------------------------------------------------------------------

    def _ready_targets(self, handle: SandboxHandle, spec: KubernetesSandbox, timeout_s: float,
                       start: float) -> list[ReadyTarget]:
        """The config's checks (else every Deployment, StatefulSet and Job it made), and every
        service the stages reach: the API server's proxy answers 503 until a ready pod backs
        the port, whatever the checks said."""
        if spec.ready:
            targets = [ReadyTarget(c.kind, c.api_version or DEFAULT_API_VERSIONS[c.kind],
                                   c.name, c.selector, c.condition,
                                   start + min(c.timeout_s or timeout_s, timeout_s))
                       for c in spec.ready]
        else:
            targets = [ReadyTarget(o["kind"], o["apiVersion"], o["name"], None, None,
                                   start + timeout_s)
                       for o in handle.state.get("objects", [])
                       if o["kind"] in CHECKED_BY_DEFAULT and o["namespaced"]]
        services = {(s.service, s.port) for s in spec.services}
        return targets + [ReadyTarget("Service", "v1", name, None, None, start + timeout_s, port)
                          for name, port in sorted(services, key=str)]

    def _look(self, client: KubeClient, namespace: str, target: ReadyTarget
              ) -> tuple[diagnose.Readiness, bool]:
        """The target's readiness, and whether the API (not the object) failed to say."""
        try:
            if target.kind == "Service" and target.port is not None:
                assert target.name is not None
                service = client.get("v1", "Service", target.name, namespace)
                selector = diagnose.service_selector(service)
                pods = client.pods(namespace, selector) if selector else []
                return diagnose.service_readiness(service, pods, target.port), False
            if target.selector is not None:  # every Pod matching it
                pods = client.pods(namespace, target.selector)
                if not pods:
                    return diagnose.Readiness(False, f"no pods match {target.selector}"), False
                states = [diagnose.readiness("Pod", pod, target.condition) for pod in pods]
                failed = next((s for s in states if s.terminal), None)
                if failed is not None:
                    return failed, False
                ready = sum(s.ready for s in states)
                return diagnose.Readiness(ready == len(states),
                                          f"{ready}/{len(states)} pods ready"), False
            assert target.name is not None
            obj = client.get(target.api_version, target.kind, target.name, namespace)
            return diagnose.readiness(target.kind, obj, target.condition), False
        except KubeError as exc:  # perhaps passing: the wait goes on, the error is its why
            return diagnose.Readiness(False, str(exc)), True

    def _pods_of(self, client: KubeClient, namespace: str, target: ReadyTarget
                 ) -> list[dict[str, Any]]:
        try:
            if target.selector is not None:
                return client.pods(namespace, target.selector)
            if target.kind == "Pod":
                return client.pods(namespace, name=target.name)
            assert target.name is not None
            obj = client.get(target.api_version, target.kind, target.name, namespace)
            selector = diagnose.service_selector(obj) if target.kind == "Service" else \
                diagnose.pod_selector(target.kind, obj, target.name)
            return client.pods(namespace, selector) if selector else []
        except KubeError:
            return []

    def wait_until_ready(self, handle: SandboxHandle, spec: KubernetesSandbox,
                         timeout_s: float, image: dict[str, Any] | None = None
                         ) -> list[dict[str, Any]]:
        """Polls every check together, each until its own deadline (all within `timeout_s`);
        stops at the first object that failed for good or ran out of time, and raises a
        SandboxError naming every object not ready, its pods and the namespace's events."""
        start = self.clock()
        namespace = handle.sandbox_id
        try:
            client = self._client_for(handle)
        except KubeError as exc:
            raise SandboxError(f"sandbox {namespace}: {exc}", "infra") from exc
        pending = self._ready_targets(handle, spec, timeout_s, start)
        results: list[dict[str, Any]] = []
        states: dict[int, diagnose.Readiness] = {}
        api_failed: dict[int, bool] = {}
        stop = False
        while pending and not stop:
            for target in list(pending):
                state, api_failed[id(target)] = self._look(client, namespace, target)
                states[id(target)] = state
                if state.ready:
                    pending.remove(target)
                    results.append({"object": target.label, "ready": True, "why": state.why,
                                    "elapsed_s": round(self.clock() - start, 2)})
                elif state.terminal or self.clock() >= target.deadline:
                    stop = True
            if pending and not stop:
                wake = min(t.deadline for t in pending)
                self.sleep(max(0.0, min(self.poll_interval_s, wake - self.clock())))
        if not pending:
            return results
        elapsed = self.clock() - start
        not_ready = [(t.label, states[id(t)], self._pods_of(client, namespace, t))
                     for t in pending]
        try:
            events = client.events(namespace)
        except KubeError as exc:
            events = [{"type": "Warning", "reason": "EventsUnavailable", "message": str(exc)}]
        pods = [p for _, _, target_pods in not_ready for p in target_pods]
        # Whose fault it is, from the events of what is not ready (its pods, its ReplicaSets):
        # a warning about an object that became ready after all proves nothing.
        names = {t.name for t in pending if t.name} | {diagnose.dig(p, "metadata.name")
                                                        for p in pods}
        related = [e for e in events if (involved := str(diagnose.dig(
            e, "involvedObject.name", ""))) in names or any(
                involved.startswith(f"{name}-") for name in names)]
        kind = diagnose.failure_kind([s for _, s, _ in not_ready], pods, related)
        if kind is FailureKind.TIMEOUT and all(api_failed[id(t)] for t in pending):
            kind = FailureKind.INFRA  # the API server, not the objects, kept the answer from us
        message = self.redactor.text(
            diagnose.not_ready_report(namespace, not_ready, events, elapsed,
                                      self._crash_logs(client, namespace, pods)))
        report = Path(handle.log_dir) / "k8s-not-ready.txt"
        try:
            report.write_text(message)
        except OSError:
            report = Path(handle.log_dir)
        raise SandboxError(message, str(kind), log_ref=str(report))

    def _crash_logs(self, client: KubeClient, namespace: str, pods: list[dict[str, Any]]
                    ) -> str:
        """The last lines a crashed container printed (its previous run's, if it restarted),
        for the first few of them: usually the reason itself."""
        quoted = []
        crashed = [(diagnose.dig(pod, "metadata.name"), container) for pod in pods
                   for container in diagnose.crashed_containers(pod)]
        for pod, container in crashed[:CRASH_LOGS_QUOTED]:
            text = ""
            for previous in (True, False):
                try:
                    text = client.pod_log(namespace, pod, container, previous=previous)
                except KubeError:
                    continue
                if text.strip():
                    break
            if text.strip():
                tail = "\n".join(text.rstrip("\n").splitlines()[-CRASH_LOG_LINES:])
                quoted.append(f"last lines of pod {pod} container {container}:\n{tail}")
        return "".join(f"\n{block}" for block in quoted)

    # --- reaching services ---------------------------------------------------------------

    def http(self, handle: SandboxHandle) -> requests.Session:
        """A session with the cluster's credentials: the endpoints are the API server's service
        proxy. If the cluster cannot be reached, a plain session (its requests then fail, and
        the stage says why)."""
        try:
            return self._client_for(handle).session()
        except KubeError:
            return requests.Session()

    # --- pipelines -----------------------------------------------------------------------

    def run_command(self, handle: SandboxHandle, name: str, argv: list[str],
                    env: dict[str, str], timeout_s: float,
                    watcher: OutputWatcher | None = None) -> GroupResult:
        """A `command` pipeline on this machine, as the local provider runs it (providers/host.py):
        it reaches the sandbox's services through their endpoints."""
        return host.run_command(handle, name, argv, env, timeout_s,
                                secret_names=self.secret_names, redactor=self.redactor,
                                record=self._record, watcher=watcher)

    def run_pipeline(self, handle: SandboxHandle, pipeline: Any, context: dict[str, Any],
                     timeout_s: float) -> PipelineResult:
        """A `k8s_job` or `k8s_resource` pipeline in the sandbox's namespace."""
        run = PipelineRun(handle, pipeline, timeout_s, connect=lambda: self._client_for(handle),
                          apply=self._apply, redactor=self.redactor,
                          poll_interval_s=self.poll_interval_s)
        if isinstance(pipeline, K8sJobPipeline):
            return run.job(context)
        if isinstance(pipeline, K8sResourcePipeline):
            return run.resource(context)
        return run.finish(False, FailureKind.INFRA,
                          f"a kubernetes sandbox cannot run '{pipeline.kind}' pipelines")

    def report_files(self, handle: SandboxHandle, pipeline: Any, pattern: str, into: Path
                     ) -> list[Path]:
        """A `k8s_job`'s reports matching `pattern`, read through the API server from the log of
        the sidecar its Job's last pod ran (reports.py says why and how)."""
        if not isinstance(pipeline, K8sJobPipeline):
            return super().report_files(handle, pipeline, pattern, into)
        job = (handle.state.get(REPORT_JOBS) or {}).get(pipeline.name)
        if job is None:
            raise ReportError(f"no Job of pipeline '{pipeline.name}' was created in sandbox "
                              f"{handle.sandbox_id}: there is nothing to read reports from")
        try:
            client = self._client_for(handle)
        except KubeError as exc:
            raise ReportError(str(exc)) from exc
        into.mkdir(parents=True, exist_ok=True)
        return fetch_reports(client, handle.sandbox_id, job, pattern, into)

    # --- artifacts and teardown ----------------------------------------------------------

    def collect_artifacts(self, handle: SandboxHandle) -> list[str]:
        """Pod logs (`k8s-pod-<pod>-<container>.log`), events (`k8s-events.json`) and the
        status of every object (`k8s-objects.json`), redacted, beside the sandbox's other logs.
        Never raises: what cannot be collected is said in `k8s-unreachable.txt`."""
        log_dir = Path(handle.log_dir)
        problems: list[str] = []
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            client = self._client_for(handle)
            namespace = handle.sandbox_id
            self._collect(client, handle, namespace, log_dir, problems)
        except Exception as exc:  # noqa: BLE001 - the debug bundle must not stop a teardown
            problems.append(f"{type(exc).__name__}: {exc}")
        if problems:
            with contextlib.suppress(OSError):
                (log_dir / "k8s-unreachable.txt").write_text(self.redactor.text(
                    f"could not collect everything from namespace {handle.sandbox_id}:\n"
                    + "\n".join(problems) + "\n"))
        try:
            return sorted(str(p) for p in log_dir.iterdir()
                          if p.is_file() and p.suffix in (".log", ".json", ".txt"))
        except OSError:
            return []

    def _collect(self, client: KubeClient, handle: SandboxHandle, namespace: str,
                 log_dir: Path, problems: list[str]) -> None:
        def attempt(what: str, step: Callable[[], Any]) -> Any:
            try:
                return step()
            except (KubeError, OSError) as exc:
                problems.append(f"{what}: {exc}")
                return None

        # The report sidecar's log is the reports, in base64: past the redactor, so not kept.
        for pod, container, text in attempt("pod logs", lambda: client.container_logs(
                namespace, None, skip={SIDECAR})) or []:
            path = log_dir / f"k8s-pod-{pod}-{container}.log"
            attempt(str(path), lambda p=path, t=text: p.write_text(self.redactor.text(t)))
        events = attempt("events", lambda: client.events(namespace))
        if events is not None:
            attempt("k8s-events.json", lambda: self._write_json(log_dir / "k8s-events.json",
                                                                events))
        objects: list[dict[str, Any]] = []
        namespace_obj = attempt("namespace", lambda: client.read_namespace(namespace))
        if namespace_obj is not None:
            objects.append(_status_of(namespace_obj, "v1", "Namespace"))
        for ref in handle.state.get("objects", []):
            if ref["kind"] == "Secret":
                continue
            obj = attempt(f"{ref['kind']} {ref['name']}",
                          lambda r=ref: client.get(r["apiVersion"], r["kind"], r["name"],
                                                   namespace))
            objects.append(_status_of(obj, ref["apiVersion"], ref["kind"], ref["name"]))
        for pod in attempt("pods", lambda: client.pods(namespace)) or []:
            objects.append(_status_of(pod, "v1", "Pod"))
        attempt("k8s-objects.json", lambda: self._write_json(log_dir / "k8s-objects.json",
                                                             objects))

    def _write_json(self, path: Path, value: Any) -> None:
        path.write_text(self.redactor.text(json.dumps(value, indent=1, default=str)))

    def destroy(self, handle: SandboxHandle, *, timeout_s: float) -> DestroyReport:
        """Kills local pipeline processes, deletes the namespace (its content first) and any
        cluster-scoped object or cluster the sandbox made, and waits until the API server says
        404. Idempotent: a namespace already gone is clean. The ledger entry stays while
        anything is left (a namespace stuck Terminating is named with what blocks it)."""
        deadline = self.clock() + timeout_s
        stopped = host.stop_processes(handle, timeout_s)
        problems: list[str] = []
        report: dict[str, Any] = {"namespace": handle.sandbox_id, "namespace_gone": False,
                                  "cluster_scoped_left": []}
        if handle.state.get("cluster"):
            cluster = CreatedCluster.from_dict(handle.state["cluster"])
            why = delete_cluster(cluster, timeout_s=max(1.0, timeout_s), redactor=self.redactor)
            report["cluster"] = cluster.name
            report["namespace_gone"] = not why  # it went with its cluster
            if why:
                problems.append(why)
        else:
            try:
                self._delete_namespace(handle, deadline, report, problems)
            except KubeError as exc:
                problems.append(f"namespace {handle.sandbox_id} could not be deleted: {exc}")
        return host.finish_destroy(handle, stopped, problems, self.ledger, self.redactor,
                                   **report)

    def _delete_namespace(self, handle: SandboxHandle, deadline: float, report: dict[str, Any],
                          problems: list[str]) -> None:
        client = self._client_for(handle)
        namespace = handle.sandbox_id
        cluster_scoped = [o for o in handle.state.get("objects", []) if not o["namespaced"]]
        for ref in cluster_scoped:  # each on its own: one refusal must not keep the namespace
            try:
                client.delete(ref["apiVersion"], ref["kind"], ref["name"], None, "Foreground")
            except KubeError as exc:
                problems.append(str(exc))
        client.delete_namespace(namespace)
        remaining: dict[str, Any] | None = client.read_namespace(namespace)
        while remaining is not None and self.clock() < deadline:
            self.sleep(max(0.0, min(self.poll_interval_s, deadline - self.clock())))
            remaining = client.read_namespace(namespace)
        report["namespace_gone"] = remaining is None
        if remaining is not None:
            problems.append(diagnose.namespace_blockers(remaining))
        for ref in cluster_scoped:
            try:
                left = client.get(ref["apiVersion"], ref["kind"], ref["name"], None) is not None
            except KubeError:
                left = True  # not verified gone
            if left:
                report["cluster_scoped_left"].append(f"{ref['kind']} {ref['name']}")
        if report["cluster_scoped_left"]:
            problems.append(f"cluster-scoped objects left: "
                            f"{', '.join(report['cluster_scoped_left'])}")

    def list_live(self) -> list[SandboxHandle]:
        """The ledger's kubernetes sandboxes, and every namespace labelled as ours on this
        provider's cluster (rebuilt from its handle annotation), each once. A cluster that
        cannot be reached leaves the ledger's entries alone: a handle carries its cluster, so
        any kubernetes provider can destroy it."""
        found = {h.sandbox_id: h for h in self.ledger.live(self.name)}
        if self.settings.create:
            return list(found.values())  # a per-run cluster exists only through its handles
        try:
            access = self._default_access()
            client = self._client(access)
            saved = client.timeout, client.retry
            client.timeout = LIST_TIMEOUT_S
            client.retry = replace(client.retry, max_elapsed_s=LIST_TIMEOUT_S)
            try:
                namespaces = client.list_namespaces(f"{MANAGED_BY[0]}={MANAGED_BY[1]}")
            finally:
                client.timeout, client.retry = saved
        except KubeError:
            return list(found.values())
        for namespace in namespaces:
            handle = self.handle_from_namespace(namespace, access)
            found.setdefault(handle.sandbox_id, handle)
        return list(found.values())

    def handle_from_namespace(self, namespace: dict[str, Any], access: ClusterAccess
                              ) -> SandboxHandle:
        """The handle a namespace carries in its annotation; from its labels if that is lost.
        Either way it is reached through `access`, the way it was found."""
        metadata = namespace.get("metadata") or {}
        name = metadata.get("name", "")
        try:
            handle = SandboxHandle.from_dict(
                json.loads((metadata.get("annotations") or {})[HANDLE_ANNOTATION]))
        except (KeyError, TypeError, ValueError):
            labels = metadata.get("labels") or {}
            config, _, engine = labels.get(PARTITION_LABEL, "").partition(".")
            try:
                expires_at = float(labels.get(EXPIRES_LABEL, "0"))
            except ValueError:
                expires_at = 0.0  # unknown: expired, so the janitor reaps it
            handle = SandboxHandle(
                sandbox_id=name, provider=self.name, config=config, engine=engine,
                run_id=labels.get(RUN_LABEL, ""), created_at=0.0, expires_at=expires_at,
                workdir=str(self.home / "sandboxes" / name),
                log_dir=str(self.home / "logs" / name), state={"namespace": name})
        if not handle.state.get("cluster"):
            handle.state["access"] = access.to_dict()
        return handle


def _status_of(obj: dict[str, Any] | None, api_version: str, kind: str, name: str = ""
               ) -> dict[str, Any]:
    """An object as the debug bundle keeps it: identity, labels and status, never its spec
    (which may hold rendered secrets)."""
    if obj is None:
        return {"apiVersion": api_version, "kind": kind, "name": name, "found": False}
    metadata = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion", api_version), "kind": obj.get("kind", kind),
            "name": metadata.get("name", name), "labels": metadata.get("labels") or {},
            "deletionTimestamp": metadata.get("deletionTimestamp"),
            "finalizers": metadata.get("finalizers") or [], "status": obj.get("status") or {}}
