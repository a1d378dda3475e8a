"""A loopback HTTP proxy in front of moto's server, for the CodeBuild answers moto cannot give,
and the moto state a CodeBuild image build needs (a project, and the image it would push).

moto's CodeBuild (moto 5.2.6, the installed package: `moto/codebuild/models.py`,
`batch_get_builds` and the build's `logs`) turns every build SUCCEEDED on its first
`batch_get_builds`, has no FAILED path, and names no CloudWatch log stream (`logs` has no
groupName/streamName).
`AwsProxy` forwards every request to moto as it came and changes only this:
- A StartBuild answer: `on_start(build, request)` is called first, when set, so a test can write
  the build's log where the build names it (`log_names`), as the running build would.
- A BatchGetBuilds answer: every build gets `logs.groupName` `/aws/codebuild/<project>` and
  `logs.streamName` (the id after `<project>:`), as real CodeBuild names them. A build of a
  project in `failing` that moto calls SUCCEEDED becomes FAILED, its BUILD phase FAILED with a
  COMMAND_EXECUTION_ERROR context and the phases after it gone; one of a project in `hanging`
  stays IN_PROGRESS in phase BUILD, and is STOPPED once a StopBuild of it went through (moto
  itself says SUCCEEDED again on the next look, even after its own StopBuild said STOPPED).
It records each call's target and JSON body in `calls`. Nothing else is emulated: no request
is checked or signed anew, no other answer changed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import requests

from mlci_dagster.providers.ports import allocate_free_port
from tests.support.dagster_services import wait_until
from tests.support.loopback import background

REGION = "us-east-1"
# What a process talking to moto gets through the standard credential chain.
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": REGION}
# Variables of a real account that must not reach a run against moto.
REAL_CREDENTIALS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")

TARGET_PREFIX = "CodeBuild_20161006."
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}
BUILD_PHASES_AFTER = ("POST_BUILD", "UPLOAD_ARTIFACTS", "FINALIZING", "COMPLETED")


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """moto's server on a free loopback port, its process group killed on exit; yields its URL."""
    port = allocate_free_port()
    url = f"http://127.0.0.1:{port}"
    with background([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    log):
        wait_until(lambda: requests.get(url, timeout=1), 30, "moto to answer", log)
        yield url


def log_names(build: dict[str, Any]) -> tuple[str, str]:
    """The CloudWatch log group and stream CodeBuild writes a build's log to."""
    project, _, run = build["id"].partition(":")
    return f"/aws/codebuild/{project}", run


class AwsProxy:
    """The proxy, serving on 127.0.0.1 in a thread of this process until `close`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.failing: set[str] = set()
        self.hanging: set[str] = set()
        self.on_start: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.failing.clear()
        self.hanging.clear()
        self.on_start = None
        self.calls.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def called(self, call: str) -> list[dict[str, Any]]:
        """The JSON bodies of every CodeBuild `call` (StartBuild, StopBuild...) so far."""
        return [body for target, body in self.calls if target == TARGET_PREFIX + call]

    # --- the rewriting -------------------------------------------------------------------

    def rewrite(self, target: str, request: dict[str, Any], answer: dict[str, Any]) -> None:
        if target == TARGET_PREFIX + "StartBuild" and self.on_start:
            self.on_start(answer["build"], request)
        if target != TARGET_PREFIX + "BatchGetBuilds":
            return
        stopped = {body["id"] for body in self.called("StopBuild")}
        for build in answer.get("builds", []):
            group, stream = log_names(build)
            build.setdefault("logs", {}).update(groupName=group, streamName=stream)
            if build.get("buildStatus") != "SUCCEEDED":
                continue
            if build["projectName"] in self.failing:
                build.update(buildStatus="FAILED", currentPhase="COMPLETED")
                build["phases"] = _failed_at_build(build.get("phases", []))
            elif build["projectName"] in self.hanging and build["id"] in stopped:
                build.update(buildStatus="STOPPED", currentPhase="COMPLETED")
            elif build["projectName"] in self.hanging:
                build.update(buildStatus="IN_PROGRESS", currentPhase="BUILD",
                             buildComplete=False)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                answer = requests.request(self.command, proxy.upstream + self.path,
                                          headers=headers, data=body, timeout=30)
                content = answer.content
                target = self.headers.get("X-Amz-Target", "")
                if target.startswith(TARGET_PREFIX):
                    request = json.loads(body or b"{}")
                    proxy.calls.append((target, request))
                    if answer.ok:
                        document = json.loads(content)
                        proxy.rewrite(target, request, document)
                        content = json.dumps(document).encode()
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in HOP_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: pytest shows failures, not every request

        return Forward


def _failed_at_build(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """moto's phases (each look at a build appends a set) as a build whose BUILD failed."""
    failed, seen = [], set()
    for phase in phases:
        kind = phase["phaseType"]
        if kind in seen or kind in BUILD_PHASES_AFTER:
            continue
        seen.add(kind)
        if kind == "BUILD":
            phase = {**phase, "phaseStatus": "FAILED", "contexts": [{
                "statusCode": "COMMAND_EXECUTION_ERROR",
                "message": "Error while executing command: docker build -t $IMAGE . "
                           "Reason: exit status 1"}]}
        failed.append(phase)
    return failed


def create_project_and_image(endpoint: str, project: str, image: str, region: str) -> str:
    """A CodeBuild project in moto, and the image its build would push put in ECR (moto's
    build pushes nothing); returns the digest ECR's describe_images gives that image."""
    codebuild = boto3.client("codebuild", endpoint_url=endpoint, region_name=region)
    codebuild.create_project(
        name=project, source={"type": "GITHUB", "location": "https://github.com/example/iris"},
        artifacts={"type": "NO_ARTIFACTS"},
        environment={"type": "LINUX_CONTAINER", "image": "aws/codebuild/standard:7.0",
                     "computeType": "BUILD_GENERAL1_SMALL", "privilegedMode": True},
        serviceRole="arn:aws:iam::123456789012:role/mlci-codebuild")
    repository, tag = image.split("/", 1)[1].rsplit(":", 1)
    ecr = boto3.client("ecr", endpoint_url=endpoint, region_name=region)
    ecr.create_repository(repositoryName=repository)
    manifest = json.dumps({"schemaVersion": 2, "mediaType":
                           "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"digest": "sha256:" + "c" * 64, "size": 2},
                           "layers": []})
    ecr.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag)
    return ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])[
        "imageDetails"][0]["imageDigest"]
