"""The registry's Kubernetes fields: a sandbox as a namespace of templated manifests, and the
pipeline kinds that run in it (a Job followed to completion, a custom resource polled to a
terminal state)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from mlci_dagster.registry.base import (
    EnvName,
    Name,
    PipelineBase,
    ReportingPipeline,
    SandboxBase,
    Seconds,
    StrictModel,
    TestReportSpec,
)

# A path inside the registry folder, such as k8s/mlflow.yaml (checked to exist when loaded).
ManifestPath = Annotated[str, StringConstraints(pattern=r"^[^/].*\.ya?ml$")]
ObjectName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")]

class ClusterSpec(StrictModel):
    """Which cluster: a kubeconfig context, the pod's own cluster, or one created per run."""

    kubeconfig: str | None = Field(
        default=None, description="Default: $KUBECONFIG, then ~/.kube/config; in a pod with "
        "neither, the in-cluster service account.")
    context: str | None = Field(default=None, description="Default: the current context.")
    create: Literal["k3d", "kind"] | None = Field(
        default=None, description="Create a cluster with this CLI for the run and delete it at "
        "teardown.")
    name: Name | None = Field(default=None, description="The created cluster's name.")

    @model_validator(mode="after")
    def _name_with_create(self) -> ClusterSpec:
        if self.create and not self.name:
            raise ValueError("name: required when 'create' is set (the cluster to create)")
        if self.name and not self.create:
            raise ValueError("name: only with 'create' (use 'context' for an existing cluster)")
        return self


class ReadyCheck(StrictModel):
    """One object that must be ready: by name, or every Pod matching a label selector."""

    kind: str = Field(description="Deployment, Pod, Job, StatefulSet or any kind with "
                                  "status.conditions (a custom resource).")
    api_version: str | None = Field(
        default=None, alias="apiVersion",
        description="Default: v1 for Pod, apps/v1 for Deployment and StatefulSet, batch/v1 for "
                    "Job; required for any other kind.")
    name: ObjectName | None = None
    selector: str | None = Field(default=None, description="A label selector (Pods only).")
    condition: str | None = Field(
        default=None, description="The condition whose status must be True. Default: Available "
        "(Deployment), Complete (Job), Ready (Pod and any other kind).")
    timeout_s: Seconds | None = Field(default=None, description="Default: timeouts.sandbox_s.")

    @model_validator(mode="after")
    def _one_target(self) -> ReadyCheck:
        if (self.name is None) == (self.selector is None):
            raise ValueError("expected exactly one of 'name' or 'selector'")
        if self.selector is not None and self.kind != "Pod":
            raise ValueError("selector: only for kind Pod (name the object otherwise)")
        if self.api_version is None and self.kind not in ("Pod", "Deployment", "StatefulSet",
                                                          "Job"):
            raise ValueError(f"apiVersion: required for kind '{self.kind}'")
        return self


class ServicePort(StrictModel):
    """A Service the stages reach through the API server's service proxy, as `name`."""

    name: Name
    service: ObjectName
    port: int | Name = Field(description="The Service's port number or port name.")
    scheme: Literal["http", "https"] = "http"


class SecretSpec(StrictModel):
    """A Kubernetes Secret created in the namespace; its values come from ${env.NAME}."""

    name: ObjectName
    data: Annotated[dict[EnvName, str], Field(min_length=1)]


class KubernetesSandbox(SandboxBase):
    """A namespace per sandbox, with the manifests applied in order and checked ready."""

    provider: Literal["kubernetes"]
    cluster: ClusterSpec = ClusterSpec()
    manifests: Annotated[list[ManifestPath], Field(min_length=1)] = Field(
        description="YAML files under the registry root, templated with ${...}, applied in "
        "order after the engine's manifests.")
    secrets: list[SecretSpec] = []
    ready: list[ReadyCheck] = []
    services: list[ServicePort] = Field(
        default=[], description="What ${services.<name>.url} and ui_smoke routes reach.")

    def named_files(self) -> list[tuple[str, str]]:
        return [(f"sandbox.manifests[{i}]", m) for i, m in enumerate(self.manifests)]

    def with_engine(self, engine: Any) -> KubernetesSandbox:
        return self.model_copy(update={"manifests": [*engine.manifests, *self.manifests]})


# The image of the sidecar that hands a k8s_job's test reports over (providers/kubernetes/
# reports.py): it needs sh, wc, tr and base64, as busybox has them. Pinned: a tag that moves
# would change what runs in every Job without a change here.
REPORT_IMAGE = "busybox:1.37.0"
GLOB_CHARACTERS = re.compile(r"[*?\[]")
# Directories a volume must not hide: the container would lose its shell, libraries or devices.
SYSTEM_DIRECTORIES = frozenset({"/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64",
                                "/proc", "/run", "/sbin", "/sys", "/usr", "/var"})


def report_directory(path: str) -> str | None:
    """The directory of a report path in a pod that a volume shared with the report sidecar is
    mounted at: its longest leading directory without a glob character (`/reports` for
    `/reports/*/junit.xml`); None when there is none but the root."""
    parts = path.split("/")[1:-1]
    kept: list[str] = []
    for part in parts:
        if GLOB_CHARACTERS.search(part):
            break
        kept.append(part)
    directory = "/" + "/".join(p for p in kept if p)
    return None if directory == "/" else directory


def _pod_report_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("a k8s_job's report is read in its pod: expected an absolute path "
                         f"there, such as /reports/junit.xml (got {value!r})")
    if ".." in value.split("/"):
        raise ValueError(f"expected a path without '..' (got {value!r})")
    directory = report_directory(value)
    if directory is None:
        raise ValueError("expected the report in a directory of its own, such as "
                         "/reports/*.xml: that directory is mounted as a volume the report "
                         f"sidecar reads (got {value!r})")
    if directory in SYSTEM_DIRECTORIES:
        raise ValueError(f"{directory} would be hidden by the volume the report sidecar reads: "
                         f"expected a directory of the report's own, such as /reports "
                         f"(got {value!r})")
    return value


class PodReportSpec(TestReportSpec):
    """A test report a k8s_job's containers write in their pod, handed over by a sidecar."""

    __test__ = False

    path: Annotated[str, AfterValidator(_pod_report_path)] = Field(
        description="Where the Job's containers write it (a shell glob for several): an "
        "absolute path in the pod, such as /reports/*.xml. Its directory (up to the first glob "
        "character) is an empty volume mounted in every container of the pod, hiding what the "
        "image holds there.")


class K8sJobPipeline(ReportingPipeline):
    """A batch/v1 Job in the sandbox's namespace, followed to completion, its pods' logs kept.
    With `reports`, the provider adds to its pod a sidecar that hands them over through the API
    server (providers/kubernetes/reports.py): the cluster must run Kubernetes 1.29 or later."""

    file_fields = ("manifest",)

    kind: Literal["k8s_job"]
    name: Name
    manifest: ManifestPath
    reports: list[PodReportSpec] = Field(  # type: ignore[assignment]  # paths in the pod
        default=[], description="The test reports its containers write: each test's result is "
        "recorded.")
    report_image: str = Field(
        default=REPORT_IMAGE, description="The image of the sidecar that hands the reports "
        "over (it runs sh, wc, tr and base64): a mirror's copy where the cluster cannot pull "
        "from Docker Hub.")
    expect_output: list[str] = Field(default=[], description="Substrings the logs must hold.")
    outputs: dict[EnvName, str] = Field(
        default={}, description="Values to capture: a regex with one group, per log line.")
    timeout_s: Seconds | None = Field(
        default=None, description="Default: what is left of timeouts.pipeline_runs_s.")


class K8sResourcePipeline(PipelineBase):
    """A custom resource (a RayJob, a SparkApplication, a platform's pipeline CR) created, then
    polled until a status field reaches a success or failure state."""

    file_fields = ("manifest",)

    kind: Literal["k8s_resource"]
    name: Name
    manifest: ManifestPath
    status_field: str = Field(description="Dotted path, e.g. status.jobStatus.")
    success_states: Annotated[list[str], Field(min_length=1)]
    failure_states: list[str] = []
    logs_selector: str | None = Field(
        default=None, description="Label selector of the pods whose logs are kept (on failure "
        "in the summary). Default: job-name=<the resource's name>, a RayJob's submitter.")
    outputs: dict[EnvName, str] = Field(
        default={}, description="Values to capture: dotted paths in the final object.")
    interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    timeout_s: Seconds | None = Field(
        default=None, description="Default: what is left of timeouts.pipeline_runs_s.")


