"""The image stage's CodeBuild builds, through the real boto3 against moto's server on loopback.

moto 5's CodeBuild turns a build SUCCEEDED on its first `batch_get_builds`, has no FAILED path
and names no log stream, so every call goes through `tests.support.aws_proxy.AwsProxy`, which
forwards to moto and rewrites only BatchGetBuilds answers: FAILED (or still IN_PROGRESS) for
the projects a test names, and the log group and stream CodeBuild would name, which the test
fills in moto's CloudWatch Logs when the build starts, as the running build would. moto's build
pushes nothing: the image is put in moto's ECR by the test, and its digest is moto's (not the
manifest's sha256 as real ECR's is).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from mlci_dagster.common.templating import IMAGE_ATTRIBUTES
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.stages.outcome import StageOutcome
from mlci_dagster.vocabulary import FailureKind, Status
from tests.support.aws_proxy import (
    FAKE_CREDENTIALS,
    REAL_CREDENTIALS,
    REGION,
    AwsProxy,
    create_project_and_image,
    log_names,
    moto_server,
)
from tests.support.registries import config, write_registry

PROJECT = "iris-serve-image"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/ml/iris-serve:nightly"
SECRET = "hf-Zq81x0Lw7Pc4"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsProxy]:
    """moto's server for the whole file, and the proxy in front of it (`upstream` is moto)."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        aws_proxy = AwsProxy(url)
        try:
            yield aws_proxy
        finally:
            aws_proxy.close()


@pytest.fixture
def aws(proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch) -> AwsProxy:
    """Fake credentials through the standard chain (the environment), moto emptied; the image
    stage reaches moto through the proxy, the tests arrange moto's state directly."""
    for name, value in {**FAKE_CREDENTIALS, "MLCI_AWS_ENDPOINT_URL": proxy.url,
                        "MLCI_BUILD_ARG": SECRET}.items():
        monkeypatch.setenv(name, value)
    for name in REAL_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    requests.post(f"{proxy.upstream}/moto-api/reset", timeout=10).raise_for_status()
    proxy.reset()
    return proxy


def codebuild_image(**fields: Any) -> dict[str, Any]:
    block = {"project": PROJECT, "source_version": "refs/heads/main",
             "environment": {"MODEL_NAME": "iris", "BUILD_ARG": "${env.MLCI_BUILD_ARG}"},
             "image": IMAGE, "aws": {"endpoint_url": "${env.MLCI_AWS_ENDPOINT_URL}"},
             "poll_interval_s": 0.05, **fields}
    return {"build": {"codebuild": block}}


def run_image_stage(tmp_path: Path, image: dict[str, Any] | None = None,
                    image_s: float = 60) -> StageOutcome:
    body = config("iris", image=image or codebuild_image())
    body["timeouts"]["image_s"] = image_s
    registry = load_registry(write_registry(tmp_path / "reg", [body]))
    ctx = LifecycleContext.create(registry, "iris", "e1", "run-1", tmp_path / "home")
    return build_image(ctx)


def write_build_log(moto_url: str, lines: list[str]) -> Callable[[dict, dict], None]:
    """When a build starts, its log as the build would write it, with the override values it
    was started with echoed at the top (as a build that prints its environment does)."""

    def on_start(build: dict[str, Any], request: dict[str, Any]) -> None:
        group, stream = log_names(build)
        logs = boto3.client("logs", endpoint_url=moto_url, region_name=REGION)
        logs.create_log_group(logGroupName=group)
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        echoed = [f"{v['name']}={v['value']}" for v in request["environmentVariablesOverride"]]
        now_ms = int(time.time() * 1000)  # CloudWatch drops events older than 14 days
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": now_ms + i, "message": f"{line}\n"}
            for i, line in enumerate([*echoed, *lines])])

    return on_start


# --- success -------------------------------------------------------------------------------


def test_a_succeeded_build_records_the_digest_ecr_describes(aws, tmp_path):
    digest = create_project_and_image(aws.upstream, PROJECT, IMAGE, REGION)

    outcome = run_image_stage(tmp_path)

    assert outcome.status is Status.PASS, outcome.error_summary
    assert outcome.details.digest == digest
    assert outcome.details.ref == IMAGE
    assert outcome.details.build_id.startswith(f"{PROJECT}:")
    # What `${image.<attribute>}` may name with a CodeBuild image (the registry checks it).
    assert set(outcome.details.attributes()) == set(IMAGE_ATTRIBUTES["image.build.codebuild"])
    [started] = aws.called("StartBuild")
    assert started["projectName"] == PROJECT
    assert started["sourceVersion"] == "refs/heads/main"
    assert sorted(started["environmentVariablesOverride"], key=lambda v: v["name"]) == [
        {"name": "BUILD_ARG", "value": SECRET, "type": "PLAINTEXT"},
        {"name": "MODEL_NAME", "value": "iris", "type": "PLAINTEXT"}]


def test_with_inputs_an_unchanged_key_reuses_the_digest_and_a_change_builds_again(
        aws, tmp_path):
    digest = create_project_and_image(aws.upstream, PROJECT, IMAGE, REGION)
    image = codebuild_image()
    image["build"]["inputs"] = ["mlci.yaml"]

    first = run_image_stage(tmp_path, image)
    second = run_image_stage(tmp_path, image)
    image["build"]["codebuild"]["source_version"] = "refs/heads/release"
    third = run_image_stage(tmp_path, image)

    assert [o.details.cached for o in (first, second, third)] == [False, True, False]
    assert first.details.digest == second.details.digest == digest
    assert len(aws.called("StartBuild")) == 2


def test_a_succeeded_build_whose_image_is_not_in_ecr_is_infra_naming_describe_images(
        aws, tmp_path):
    create_project_and_image(aws.upstream, PROJECT, IMAGE, REGION)

    outcome = run_image_stage(tmp_path, codebuild_image(image=IMAGE.replace("nightly", "gone")))

    assert outcome.failure_kind is FailureKind.INFRA
    assert "SUCCEEDED, but its image" in outcome.error_summary
    assert "DescribeImages: " in outcome.error_summary
    assert "ImageNotFoundException" in outcome.error_summary


# --- failure -------------------------------------------------------------------------------


def test_a_failed_build_is_a_product_failure_with_its_log_tail(aws, tmp_path):
    create_project_and_image(aws.upstream, PROJECT, IMAGE, REGION)
    aws.failing.add(PROJECT)
    aws.on_start = write_build_log(aws.upstream, [f"#{i:03d}" for i in range(1, 41)])

    outcome = run_image_stage(tmp_path)

    assert outcome.status is Status.FAIL
    assert outcome.failure_kind is FailureKind.PRODUCT
    summary = outcome.error_summary
    assert summary.startswith(f"CodeBuild project {PROJECT}: build {PROJECT}:")
    assert "ended FAILED: phase BUILD FAILED (COMMAND_EXECUTION_ERROR: " in summary
    # The last 30 lines of the 42 the build wrote: two echoed variables and steps 1 to 40.
    assert summary.endswith("\n#040")
    assert "\n#011\n" in summary and "#010" not in summary
    assert outcome.details.build_status == "FAILED"


def test_a_secret_in_an_environment_override_never_reaches_the_summary(aws, tmp_path):
    create_project_and_image(aws.upstream, PROJECT, IMAGE, REGION)
    aws.failing.add(PROJECT)
    aws.on_start = write_build_log(aws.upstream, ["docker build failed"])

    outcome = run_image_stage(tmp_path)

    assert outcome.failure_kind is FailureKind.PRODUCT
    [started] = aws.called("StartBuild")
    assert {"name": "BUILD_ARG", "value": SECRET, "type": "PLAINTEXT"} in started[
        "environmentVariablesOverride"]  # it did reach the build, and its log
    assert "BUILD_ARG=***" in outcome.error_summary
    assert SECRET not in str(outcome.to_dict())


def test_a_build_past_the_image_timeout_is_stopped_and_is_a_timeout(aws, tmp_path):
    create_project_and_image(aws.upstream, PROJECT, IMAGE, REGION)
    aws.hanging.add(PROJECT)
    aws.on_start = write_build_log(aws.upstream, ["building layer 3/7"])

    outcome = run_image_stage(tmp_path, image_s=1)

    assert outcome.failure_kind is FailureKind.TIMEOUT
    assert "still IN_PROGRESS in phase BUILD after 1s" in outcome.error_summary
    assert "building layer 3/7" in outcome.error_summary
    assert aws.called("StopBuild") == [{"id": outcome.details.build_id}]
    assert outcome.duration_s < 10


def test_an_unknown_project_is_infra_naming_start_build(aws, tmp_path):
    outcome = run_image_stage(tmp_path)

    assert outcome.failure_kind is FailureKind.INFRA
    assert outcome.error_summary.startswith(
        f"CodeBuild project {PROJECT}: StartBuild: ResourceNotFoundException: ")
    assert aws.called("BatchGetBuilds") == []


def test_an_unset_variable_is_the_tests_own_fault_naming_the_field_and_the_variable(aws, tmp_path,
                                                                     monkeypatch):
    monkeypatch.delenv("MLCI_BUILD_ARG")

    outcome = run_image_stage(tmp_path)

    assert outcome.failure_kind is FailureKind.CONFIG
    assert outcome.error_summary.endswith("iris.yaml: image.build.codebuild.environment: "
                                          "environment variable MLCI_BUILD_ARG is not set")
    assert aws.called("StartBuild") == []


# --- registry ------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "expected"), [
    ({"build": {"command": ["make", "image"], "inputs": ["mlci.yaml"],
                **codebuild_image()["build"]}},
     "image.build: expected exactly one of 'command' (a build on this machine) or 'codebuild'"),
    ({"build": {"inputs": ["mlci.yaml"]}}, "image.build: expected exactly one of 'command'"),
    ({"build": {"codebuild": {"image": IMAGE}}}, "image.build.codebuild.project: Field required"),
    ({"build": {"command": ["make", "image"]}}, "image.build: inputs: required with 'command'"),
    (codebuild_image(image="ghcr.io/example/iris:nightly"),
     "image.build.codebuild.image: expected an ECR image <account>.dkr.ecr.<region>"),
    (codebuild_image(source_version="${vars.BRANCH}"),
     "image.build.codebuild: ${vars.BRANCH}: only ${env.NAME} can be used"),
    (codebuild_image(aws={"region": "mars"}),
     "image.build.codebuild.aws.region: expected an AWS region"),
    (codebuild_image(projct="x"),
     "image.build.codebuild.projct: unknown key 'projct' (did you mean 'project'?)"),
])
def test_registry_errors_name_the_file_and_the_field(tmp_path, image, expected):
    root = write_registry(tmp_path, [config("iris", image=image)])

    with pytest.raises(RegistryError) as raised:
        load_registry(root)

    path = root / "configs" / "iris.yaml"
    assert any(p.startswith(f"{path}: ") and expected in p for p in raised.value.problems), \
        raised.value.problems
