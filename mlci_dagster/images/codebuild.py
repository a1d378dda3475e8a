"""Image builds on AWS CodeBuild, without Dagster: one `start_build` of a project, followed with
`batch_get_builds` to a terminal status; on success the digest ECR gives the image the build
pushed, on failure the tail of the build's CloudWatch log. A build that outlives its time, or
whose follower is interrupted, is stopped. Every error names its call."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from mlci_dagster.common.aws import (
    AwsAccess,
    AwsError,
    AwsSettings,
    aws_client,
    call_aws,
)
from mlci_dagster.common.templating import TemplateError, render, unset_env_references
from mlci_dagster.images.ecr import ECR_HOST, EcrRegistry
from mlci_dagster.images.errors import ImageRegistryError
from mlci_dagster.images.ref import parse_image_ref
from mlci_dagster.registry.aws import CodeBuildSpec
from mlci_dagster.vocabulary import FailureKind

TERMINAL = ("SUCCEEDED", "FAILED", "FAULT", "STOPPED", "TIMED_OUT")
# How a build that ended badly counts: its commands failed (the product), it ran out of the
# project's own timeout, or CodeBuild (FAULT) or someone else (STOPPED) ended it.
FAILURE_KINDS = {"FAILED": FailureKind.PRODUCT, "TIMED_OUT": FailureKind.TIMEOUT,
                 "FAULT": FailureKind.INFRA, "STOPPED": FailureKind.INFRA}
LOG_TAIL_LINES = 30


class CodeBuildError(AwsError):
    """A CodeBuild or CloudWatch Logs call that failed."""


@dataclass(frozen=True)
class BuildRequest:
    """A `codebuild` block with its `${env.NAME}` filled in: what one build is started with."""

    project: str
    source_version: str | None
    environment: dict[str, str]
    image: str
    access: AwsAccess
    poll_interval_s: float

    @classmethod
    def of(cls, spec: CodeBuildSpec) -> BuildRequest:
        """Raises TemplateError (a ValueError) naming the field and an unset variable, or an
        image that is no ECR `<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>`."""
        fields = {"source_version": spec.source_version, "environment": spec.environment,
                  "image": spec.image}
        for field, value in fields.items():
            missing = unset_env_references(value)
            if missing:  # said alone: a TemplateError of render would list the whole environment
                raise TemplateError(f"codebuild.{field}: environment variable {missing[0]} is "
                                    "not set")
        resolved = render(fields, {"env": dict(os.environ)})
        host = ecr_host(resolved["image"])
        try:
            access = AwsSettings(spec.aws.region or host["region"],
                                 spec.aws.endpoint_url).resolve()
        except TemplateError as exc:
            raise TemplateError(f"codebuild.aws.{exc}") from exc
        return cls(spec.project, resolved["source_version"] or None, resolved["environment"],
                   resolved["image"], access, spec.poll_interval_s)


def ecr_host(image: str) -> dict[str, str]:
    """The account and region of an ECR image with a tag; ValueError otherwise."""
    try:
        ref = parse_image_ref(image)
    except ValueError as exc:
        raise ValueError(f"codebuild.image: {exc}") from exc
    match = ECR_HOST.match(ref.registry)
    if match is None or ref.tag is None or ref.digest is not None:
        raise ValueError(f"codebuild.image: '{image}' is not an ECR image with a tag (expected "
                         "<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>)")
    return match.groupdict()


@dataclass
class BuildReport:
    """How one build ended: `failure_kind` None when it passed, and then `digest` is ECR's."""

    build_id: str
    status: str
    summary: str = ""
    failure_kind: FailureKind | None = None
    digest: str = ""
    log_ref: str = ""


class CodeBuildClient:
    """codebuild and logs clients of one region (and endpoint URL)."""

    def __init__(self, access: AwsAccess) -> None:
        self.codebuild = aws_client("codebuild", access)
        self.logs = aws_client("logs", access)

    def start(self, request: BuildRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"projectName": request.project}
        if request.source_version:
            kwargs["sourceVersion"] = request.source_version
        if request.environment:
            kwargs["environmentVariablesOverride"] = [
                {"name": name, "value": value, "type": "PLAINTEXT"}
                for name, value in request.environment.items()]
        return call_aws("StartBuild", self.codebuild.start_build, CodeBuildError,
                        **kwargs)["build"]

    def describe(self, build_id: str) -> dict[str, Any]:
        builds = call_aws("BatchGetBuilds", self.codebuild.batch_get_builds, CodeBuildError,
                          ids=[build_id])["builds"]
        if not builds:
            raise CodeBuildError(f"BatchGetBuilds: build {build_id} not found",
                                 "BatchGetBuilds", "buildsNotFound")
        return builds[0]

    def stop(self, build_id: str) -> None:
        call_aws("StopBuild", self.codebuild.stop_build, CodeBuildError, id=build_id)

    def log_tail(self, build: dict[str, Any], lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` events of the build's CloudWatch log stream."""
        logs = build.get("logs") or {}
        group, stream = logs.get("groupName"), logs.get("streamName")
        if not group or not stream:
            raise CodeBuildError("GetLogEvents: the build names no CloudWatch log stream "
                                 "(logs.groupName, logs.streamName)", "GetLogEvents")
        events = call_aws("GetLogEvents", self.logs.get_log_events, CodeBuildError,
                          logGroupName=group, logStreamName=stream, limit=lines,
                          startFromHead=False)["events"]
        return [event["message"].rstrip("\n") for event in events]


def run_build(request: BuildRequest, timeout_s: float,
              client: CodeBuildClient | None = None) -> BuildReport:
    """Starts one build and follows it for at most `timeout_s`; never raises for what AWS
    answers (a report of kind infra names the call), only for an interruption, after stopping
    the build."""
    client = client or CodeBuildClient(request.access)
    where = f"CodeBuild project {request.project}"
    try:
        build_id = client.start(request)["id"]
    except CodeBuildError as exc:
        return BuildReport("", "", f"{where}: {exc}", FailureKind.INFRA)
    where = f"{where}: build {build_id}"
    try:
        build = _follow(client, build_id, time.monotonic() + timeout_s, request.poll_interval_s)
    except CodeBuildError as exc:
        return BuildReport(build_id, "", f"{where}: {exc}; {_stop(client, build_id)}",
                           FailureKind.INFRA)
    except BaseException:
        _stop(client, build_id)  # an interrupted run leaves no build pushing behind it
        raise
    status, log_ref = build.get("buildStatus", ""), (build.get("logs") or {}).get("deepLink", "")
    if status not in TERMINAL:
        return BuildReport(build_id, status, (
            f"{where}: still {status} in phase {build.get('currentPhase', '?')} after "
            f"{timeout_s:g}s (timeouts.image_s); {_stop(client, build_id)}\n"
            f"{_log_tail(client, build)}"), FailureKind.TIMEOUT, log_ref=log_ref)
    if status != "SUCCEEDED":
        return BuildReport(build_id, status, (
            f"{where} ended {status}{_failed_phases(build)}\n{_log_tail(client, build)}"),
            FAILURE_KINDS[status], log_ref=log_ref)
    image = parse_image_ref(request.image)
    try:
        registry = EcrRegistry(image.registry, endpoint_url=request.access.endpoint_url)
        digest = registry.digest(image.repository, image.tag or "")
    except ImageRegistryError as exc:
        return BuildReport(build_id, status, f"{where} SUCCEEDED, but its image {request.image} "
                           f"has no digest: DescribeImages: {exc}", FailureKind.INFRA,
                           log_ref=log_ref)
    return BuildReport(build_id, status, digest=digest, log_ref=log_ref)


def _follow(client: CodeBuildClient, build_id: str, deadline: float, interval_s: float
            ) -> dict[str, Any]:
    """The build once its status is terminal, or as it was last seen at the deadline."""
    while True:
        build = client.describe(build_id)
        if build.get("buildStatus") in TERMINAL or time.monotonic() >= deadline:
            return build
        time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))


def _stop(client: CodeBuildClient, build_id: str) -> str:
    try:
        client.stop(build_id)
    except CodeBuildError as exc:
        return f"it could not be stopped: {exc}"
    return "stopped it (StopBuild)"


def _failed_phases(build: dict[str, Any]) -> str:
    """`: phase BUILD FAILED (COMMAND_EXECUTION_ERROR: ...)` for each phase that did not
    succeed."""
    parts = []
    for phase in build.get("phases") or []:
        if phase.get("phaseStatus") in (None, "SUCCEEDED"):
            continue
        why = "; ".join(f"{c.get('statusCode', '')}: {c.get('message', '')}"
                        for c in phase.get("contexts") or [])
        parts.append(f"phase {phase.get('phaseType')} {phase['phaseStatus']}"
                     + (f" ({why})" if why else ""))
    return f": {', '.join(parts)}" if parts else ""


def _log_tail(client: CodeBuildClient, build: dict[str, Any]) -> str:
    try:
        lines = client.log_tail(build)
    except CodeBuildError as exc:
        return f"(no log tail: {exc})"
    return "\n".join(lines) if lines else "(its log is empty)"
