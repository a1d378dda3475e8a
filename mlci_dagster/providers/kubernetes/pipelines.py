"""Pipelines in a Kubernetes sandbox: `k8s_job` (a Job followed to Complete or Failed, its pods'
logs judged as a command's output is) and `k8s_resource` (a custom resource polled until a
status field reaches a success or failure state).

Neither goes through `dagster_k8s.execute_k8s_job` or `PipesK8sClient`: both need a Dagster op
or asset context, and both build their own workload from an image and a command, deleting it
when it fails or ends. The core is Dagster-free, runs the registry's own manifest as written,
keeps a failed Job's pods for the debug bundle, and polls custom resources, which neither does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mlci_dagster.common.redact import Redactor
from mlci_dagster.common.summary import summarize
from mlci_dagster.common.templating import render
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.providers.kubernetes import diagnose, reports
from mlci_dagster.providers.kubernetes.client import KubeClient, KubeError
from mlci_dagster.providers.kubernetes.manifests import ManifestError
from mlci_dagster.providers.logpipe import STDOUT, OutputWatcher
from mlci_dagster.registry.kubernetes import K8sJobPipeline, K8sResourcePipeline
from mlci_dagster.vocabulary import FailureKind

Edit = Callable[[dict[str, Any]], dict[str, Any]]  # a rendered document, changed before created


class Apply(Protocol):
    """Creates a manifest's documents in the sandbox's namespace, each as `edit` returns it
    (the provider's `_apply`)."""

    def __call__(self, client: KubeClient, handle: SandboxHandle, manifest: str,
                 context: dict[str, Any], edit: Edit | None = None) -> list[dict[str, Any]]: ...


SUMMARY_CHARS = 2000  # a pipeline's summary: its first line and the end of its logs
REPORT_JOBS = "report_jobs"  # handle.state: the Job of each k8s_job pipeline with reports

# Terminal states of well-known custom resources (ray-project/kuberay
# `ray-operator/apis/ray/v1/rayjob_types.go`, JobStatus; kubeflow/spark-operator
# `api/v1beta2/sparkapplication_types.go`, ApplicationStateType): reaching one that the config
# does not list as a success is a failure, not a wait until the timeout.
KNOWN_TERMINAL = {
    ("RayJob", "status.jobStatus"): {"SUCCEEDED", "FAILED", "STOPPED"},
    ("SparkApplication", "status.applicationState.state"): {"COMPLETED", "FAILED"},
}
# Fields that say why a well-known custom resource failed, shown in the summary.
REASON_FIELDS = ("status.reason", "status.message", "status.applicationState.errorMessage",
                 "status.jobDeploymentStatus")


def last_traceback(text: str) -> str:
    """The last Python traceback in `text` (through its exception line), or ""."""
    start = text.rfind("Traceback (most recent call last):")
    if start < 0:
        return ""
    lines = text[start:].splitlines()
    end = next((i for i, line in enumerate(lines[1:], start=1)
                if line and not line.startswith((" ", "\t"))), len(lines) - 1)
    return "\n".join(lines[:end + 1])


def log_tail(text: str, chars: int = SUMMARY_CHARS) -> str:
    """The end of the logs; when a traceback is not at their very end (a RayJob's submitter
    prints its own lines after the driver's), it is repeated last, where a summary keeping the
    tail finds it."""
    tail = text[-chars:]
    traceback = last_traceback(text)
    if traceback and not tail.rstrip().endswith(traceback.splitlines()[-1]):
        return f"{tail.rstrip()}\nthe last traceback in the logs:\n{traceback}"
    return tail


class PipelineRun:
    """One `k8s_job` or `k8s_resource` pipeline: create, poll to a terminal state or the
    timeout, keep the logs, judge."""

    def __init__(self, handle: SandboxHandle, pipeline: Any, timeout_s: float, *,
                 connect: Callable[[], KubeClient], apply: Apply, redactor: Redactor,
                 poll_interval_s: float) -> None:
        self.handle, self.pipeline, self.timeout_s = handle, pipeline, timeout_s
        self.connect, self.apply, self.redactor = connect, apply, redactor
        self.poll_interval_s = poll_interval_s
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.log_path = Path(handle.log_dir) / f"pipeline-{pipeline.name}.log"
        self.transcript: list[str] = []

    def note(self, line: str) -> None:
        self.transcript.append(f"[{time.monotonic() - self.start:6.1f}s] {line}")

    def finish(self, passed: bool, kind: FailureKind | None = None, summary: str = "",
               logs: str = "", **extra: Any) -> PipelineResult:
        redact = self.redactor.text
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text(redact("\n".join(self.transcript) + "\n" + logs))
        except OSError as exc:
            summary += f"\n(log not written: {exc})"
        return PipelineResult(self.pipeline.name, self.pipeline.kind, passed,
                              time.monotonic() - self.start, kind,
                              summarize(redact(summary), SUMMARY_CHARS), str(self.log_path),
                              **extra)

    def _create(self, client: KubeClient, context: dict[str, Any], edit: Edit | None = None
                ) -> list[dict[str, Any]]:
        pipeline = self.pipeline
        created = self.apply(client, self.handle, pipeline.manifest, context, edit)
        for obj in created:
            self.note(f"created {obj.get('kind')} {diagnose.dig(obj, 'metadata.name')}")
        return created

    def _logs(self, client: KubeClient, selector: str) -> tuple[str, list[str]]:
        """The logs of the pods matching `selector`, as one text with a header per container,
        and as the bare texts (what expectations are checked against)."""
        try:
            # The report sidecar's log is the reports, in base64: past the redactor, so not kept.
            logs = client.container_logs(self.handle.sandbox_id, selector, skip={reports.SIDECAR})
        except KubeError as exc:
            return f"--- logs of pods {selector} unavailable: {exc}\n", []
        if not logs:
            return f"--- no pods match {selector}\n", []
        text = "".join(f"--- pod {pod} container {container}\n{log}"
                       + ("" if log.endswith("\n") else "\n") for pod, container, log in logs)
        return text, [log for _, _, log in logs]

    def _pod_states(self, client: KubeClient, selector: str) -> list[dict[str, Any]]:
        try:
            return client.pods(self.handle.sandbox_id, selector)
        except KubeError:
            return []

    def _sleep(self, interval_s: float) -> None:
        time.sleep(max(0.0, min(interval_s, self.deadline - time.monotonic())))

    def _delete(self, client: KubeClient, obj: dict[str, Any]) -> str:
        name = diagnose.dig(obj, "metadata.name")
        try:
            client.delete(obj["apiVersion"], obj["kind"], name, self.handle.sandbox_id,
                          "Background")
            return f"{obj['kind']} {name} deleted"
        except KubeError as exc:
            return f"{obj['kind']} {name} could not be deleted: {exc}"

    # --- k8s_job -------------------------------------------------------------------------

    def job(self, context: dict[str, Any]) -> PipelineResult:
        """Creates the manifest's documents (exactly one of them a Job), polls the Job until
        Complete or Failed, then judges its pods' logs as a command pipeline's output is
        judged. At the timeout the Job is deleted, its pods with it. With `reports`, the Job's
        pod gets the sidecar that hands them over (reports.py), and the handle names the Job
        for `report_files`."""
        pipeline: K8sJobPipeline = self.pipeline
        edit: Edit | None = None
        try:
            client = self.connect()
            if pipeline.reports:
                if refusal := reports.version_refusal(client):
                    return self.finish(False, FailureKind.CONFIG, f"could not create the Job: "
                                                                  f"{refusal}")
                edit = reports.sidecar_edit([render(spec.path, context)
                                             for spec in pipeline.reports],
                                            pipeline.report_image)
            created = self._create(client, context, edit)
        except ManifestError as exc:
            return self.finish(False, FailureKind.CONFIG, f"could not create the Job: {exc}")
        except (KubeError, OSError) as exc:
            return self.finish(False, FailureKind.INFRA, f"could not create the Job: {exc}")
        jobs = [o for o in created if o.get("kind") == "Job"]
        if len(jobs) != 1:
            return self.finish(False, FailureKind.INFRA,
                               f"{pipeline.manifest}: expected one Job, found {len(jobs)}")
        job = jobs[0]
        name = diagnose.dig(job, "metadata.name")
        if pipeline.reports:
            self.handle.state.setdefault(REPORT_JOBS, {})[pipeline.name] = name
        selector = f"job-name={name}"
        state, error = diagnose.Readiness(False, "not looked at yet"), ""
        while True:
            try:
                found = client.get("batch/v1", "Job", name, self.handle.sandbox_id)
                state, error = diagnose.readiness("Job", found), ""
                if found is None:
                    error = f"Job {name} disappeared before it finished"
                    break
            except KubeError as exc:
                error = str(exc)
            if state.ready or state.terminal or time.monotonic() >= self.deadline:
                break
            self._sleep(self.poll_interval_s)
        self.note(f"Job {name}: {error or state.why}")
        logs, texts = self._logs(client, selector)
        details = {"job": name, "state": error or state.why}

        def failed(kind: FailureKind, why: str, pods: list[dict[str, Any]] = ()) -> PipelineResult:
            described = "".join(f"{diagnose.describe_pod(p)}\n" for p in pods)
            return self.finish(False, kind, f"{why}\n{described}{log_tail(logs)}", logs,
                               details=details)

        if not (state.ready or state.terminal):
            pods = self._pod_states(client, selector)
            deleted = self._delete(client, job) if not error.endswith("disappeared before it "
                                                                      "finished") else ""
            if deleted:
                self.note(deleted)
            if error:  # the API, not the Job, failed us
                return failed(FailureKind.INFRA, f"Job {name}: {error}", pods)
            # Pods that cannot be scheduled or pulled explain the wait; anything else is time.
            blamed = diagnose.failure_kind([], pods, [])
            kind = FailureKind.INFRA if blamed is FailureKind.INFRA else FailureKind.TIMEOUT
            return failed(kind, f"Job {name} not finished at the timeout of "
                                f"{self.timeout_s:g}s ({state.why}); {deleted}", pods)
        if state.terminal:
            return failed(FailureKind.PRODUCT, f"Job {name} failed: {state.why}",
                          self._pod_states(client, selector))
        watcher = OutputWatcher(render(pipeline.expect_output, context), pipeline.outputs)
        for text in texts:
            watcher.feed(STDOUT, text)
        if watcher.missing:
            return failed(FailureKind.PRODUCT, f"Job {name}: logs lack {watcher.missing[0]!r}")
        for key, pattern in pipeline.outputs.items():
            if key not in watcher.captured:
                return failed(FailureKind.PRODUCT,
                              f"Job {name}: output '{key}' not found: /{pattern}/")
        return self.finish(True, logs=logs, details=details,
                           outputs={key: watcher.captured[key] for key in pipeline.outputs})

    # --- k8s_resource --------------------------------------------------------------------

    def resource(self, context: dict[str, Any]) -> PipelineResult:
        """Creates the manifest's documents; the last one is the resource polled (any before
        it, a ConfigMap of code say, come first). Polls its status field every `interval_s`
        until a success or failure state (or a well-known kind's terminal state), or the
        timeout, when it is deleted. The logs of its pods are kept, and quoted on failure."""
        pipeline: K8sResourcePipeline = self.pipeline
        try:
            client = self.connect()
            created = self._create(client, context)
        except (KubeError, ManifestError, OSError) as exc:
            return self.finish(False, FailureKind.INFRA,
                               f"could not create the resource: {exc}")
        if not created:
            return self.finish(False, FailureKind.INFRA, f"{pipeline.manifest}: no document")
        resource = created[-1]
        kind, name = resource.get("kind", "?"), diagnose.dig(resource, "metadata.name")
        label = f"{kind} {name}"
        selector = pipeline.logs_selector or default_logs_selector(kind, name)
        terminal = KNOWN_TERMINAL.get((kind, pipeline.status_field), set())
        obj: dict[str, Any] = resource
        value: str | None = None
        error = ""
        while True:
            try:
                found = client.get(resource["apiVersion"], kind, name, self.handle.sandbox_id)
                error = ""
            except KubeError as exc:
                found, error = obj, str(exc)
            if found is None:
                outcome, error = "gone", f"{label} disappeared before it finished"
                break
            obj = found
            current = diagnose.dig(obj, pipeline.status_field)
            current = None if current is None else str(current)
            if current != value or not self.transcript:
                self.note(f"{label}: {pipeline.status_field} = {current}")
            value = current
            if value in pipeline.success_states:
                outcome = "success"
                break
            if value in pipeline.failure_states or value in terminal \
                    or _deployment_failed(kind, obj):
                outcome = "failure"
                break
            if time.monotonic() >= self.deadline:
                outcome = "api" if error else "timeout"
                break
            self._sleep(pipeline.interval_s)
        logs, _ = self._logs(client, selector)
        details = {"resource": label, "status": value}
        reasons = "; ".join(f"{path.rsplit('.', 1)[-1]}: {v}" for path in REASON_FIELDS
                            if (v := diagnose.dig(obj, path)) not in (None, ""))
        state = f"{pipeline.status_field} = {value}" + (f" ({reasons})" if reasons else "")
        logs_part = f"\nlogs of pods {selector}:\n{log_tail(logs)}"
        if outcome == "success":
            outputs = {key: diagnose.dig(obj, path) for key, path in pipeline.outputs.items()}
            missing = [f"'{key}' ({pipeline.outputs[key]})" for key, v in outputs.items()
                       if v is None]
            if missing:
                return self.finish(False, FailureKind.PRODUCT,
                                   f"{label} ended {value} but the final object lacks output "
                                   f"{', '.join(missing)}", logs, details=details)
            return self.finish(True, logs=logs, details=details, outputs=outputs)
        if outcome == "failure":
            return self.finish(False, FailureKind.PRODUCT, f"{label} ended {state}{logs_part}",
                               logs, details=details)
        if outcome == "gone":
            return self.finish(False, FailureKind.INFRA, f"{error}; last {state}{logs_part}",
                               logs, details=details)
        deleted = self._delete(client, resource)
        self.note(deleted)
        if outcome == "api":
            return self.finish(False, FailureKind.INFRA, f"{label}: {error}; last {state}; "
                               f"{deleted}{logs_part}", logs, details=details)
        return self.finish(False, FailureKind.TIMEOUT, f"{label} still {state} at the timeout "
                           f"of {self.timeout_s:g}s; {deleted}{logs_part}", logs,
                           details=details)


def default_logs_selector(kind: str, name: str) -> str:
    """Whose logs tell what a resource did: a SparkApplication's driver; otherwise the Job
    named after the resource (a RayJob's submitter, whose log is the driver's)."""
    if kind == "SparkApplication":
        return f"spark-role=driver,sparkoperator.k8s.io/app-name={name}"
    return f"job-name={name}"


def _deployment_failed(kind: str, obj: dict[str, Any]) -> bool:
    """A RayJob whose deployment failed (it could not even submit) never reaches a job
    status: its jobDeploymentStatus says so instead."""
    return kind == "RayJob" and diagnose.dig(obj, "status.jobDeploymentStatus") in (
        "Failed", "ValidationFailed")
