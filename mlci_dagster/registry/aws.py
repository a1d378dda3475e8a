"""The registry's AWS fields: a SageMaker sandbox (a model, an endpoint config and an endpoint
serving one container image), the pipeline kind that invokes it, and an image built by a
CodeBuild project that pushes it to ECR."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from mlci_dagster.common.templating import iter_references
from mlci_dagster.registry.base import (
    BilledResource,
    EnvName,
    Name,
    PipelineBase,
    SandboxBase,
    Seconds,
    StrictModel,
    matching_or_reference,
)

REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"
ROLE_PATTERN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$"


Region = Annotated[str, matching_or_reference(REGION_PATTERN, "an AWS region such as us-east-1")]
EndpointUrl = Annotated[str, matching_or_reference(r"(?s)https?://.*",
                                                   "an http:// or https:// URL")]
RoleArn = Annotated[str, matching_or_reference(
    ROLE_PATTERN, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)")]
EcrImage = Annotated[str, matching_or_reference(
    r"[0-9]{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/[a-z0-9][a-z0-9._/-]*:[\w][\w.-]{0,127}",
    "an ECR image <account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>")]
CodeBuildProject = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{1,254}$")]
InstanceType = Annotated[str, StringConstraints(pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$")]
# A payload file inside the registry folder, such as payloads/iris.json (checked when loaded).
PayloadPath = Annotated[str, StringConstraints(pattern=r"^[^/]")]


class EndpointService(StrictModel):
    """The name the endpoint goes by: `${services.<name>.url}` is its invocations URL."""

    name: Name = "endpoint"


class SageMakerSandbox(SandboxBase):
    """A SageMaker real-time endpoint per sandbox: model, endpoint config and endpoint, each
    tagged with the run, the partition and the expiry, waited to InService."""

    provider: Literal["aws-sagemaker"]
    region: Region = Field(
        default="us-east-1", description="The AWS region; may be templated "
        "(${env.AWS_REGION}).")
    endpoint_url: EndpointUrl | None = Field(
        default=None, description="Another SageMaker API endpoint (a VPC endpoint, a moto "
        "server), for both sagemaker and sagemaker-runtime; may be templated "
        "(${env.MLCI_AWS_ENDPOINT_URL}): an unset or empty variable means AWS itself.")
    image: str = Field(
        default="${image.ref}", description="The inference container's image (an ECR image); "
        "templated, default the config's image.")
    instance_type: InstanceType = "ml.m5.large"
    instance_count: Annotated[int, Field(ge=1, le=100)] = 1
    execution_role_arn: RoleArn = Field(
        description="The IAM role SageMaker assumes to pull the image and write logs; may be "
        "templated (${env.NAME}).")
    environment: dict[EnvName, str] = Field(
        default={}, description="The container's environment; templated. ${env.NAME} values "
        "reach SageMaker, where they are visible to anyone who can describe the model: keep "
        "secrets out.")
    model_data_url: str | None = Field(
        default=None, pattern=r"^s3://", description="Model artifacts (model.tar.gz) in S3.")
    wait_timeout_s: Seconds | None = Field(
        default=None, description="How long the endpoint may take to reach InService. "
        "Default: timeouts.sandbox_s.")
    services: Annotated[list[EndpointService], Field(min_length=1, max_length=1)] = Field(
        default=[EndpointService()], description="One entry: the endpoint's name in "
        "${services.<name>.url}.")

    def billed_resources(self) -> list[BilledResource]:
        return [BilledResource(self.instance_type, self.instance_count, False,
                               "sandbox.instance_type")]


class SageMakerInvokePipeline(PipelineBase):
    """`invoke_endpoint` on the sandbox's endpoint with a payload, judged on the response's
    status, content and JSON fields; the latency is an output."""

    file_fields = ("payload_file",)

    kind: Literal["sagemaker_invoke"]
    name: Name
    content_type: str = "application/json"
    accept: str | None = None
    payload: Any = Field(
        default=None, description="The request body: JSON (sent serialized) or a string "
        "(sent as is); templated.")
    payload_file: PayloadPath | None = Field(
        default=None, description="A file under the registry root sent as the body, as is.")
    expect_status: int = Field(
        default=200, description="The model's HTTP status: 200, or the status of a model error "
        "(SageMaker's ModelError carries the container's).")
    contains: list[str] = Field(default=[], description="Substrings the response must hold.")
    json_equals: dict[str, Any] = Field(
        default={}, description="Dotted path in the JSON response -> expected value.")
    outputs: dict[EnvName, str] = Field(
        default={}, description="Values to capture: dotted paths in the JSON response. "
        "`latency_ms` is always output.")
    timeout_s: Seconds | None = Field(
        default=None, description="Default: what is left of timeouts.pipeline_runs_s.")

    @model_validator(mode="after")
    def _one_payload(self) -> SageMakerInvokePipeline:
        if (self.payload is None) == (self.payload_file is None):
            raise ValueError("expected exactly one of 'payload' or 'payload_file'")
        return self


class AwsApi(StrictModel):
    """Where AWS's APIs are reached, written as a SageMaker sandbox writes it."""

    region: Region | None = Field(
        default=None, description="The AWS region; may be templated (${env.AWS_REGION}). "
        "Default: the region in the image's ECR host.")
    endpoint_url: EndpointUrl | None = Field(
        default=None, description="Another API endpoint (a VPC endpoint, a moto server), for "
        "every service the build calls (codebuild, logs, ecr); may be templated "
        "(${env.MLCI_AWS_ENDPOINT_URL}): an unset or empty variable means AWS itself.")


class CodeBuildSpec(StrictModel):
    """An image built by an AWS CodeBuild project, whose buildspec pushes it to ECR: one
    `start_build`, followed to its end; the digest is ECR's."""

    project: CodeBuildProject = Field(description="The CodeBuild project's name.")
    source_version: str | None = Field(
        default=None, description="The commit, branch or tag to build (the project's default "
        "if unset); may be templated (${env.GIT_COMMIT}).")
    environment: dict[EnvName, str] = Field(
        default={}, description="Variables for this build (PLAINTEXT overrides); values may "
        "be templated (${env.NAME}). CodeBuild shows them to anyone who can read the build: "
        "keep real secrets in the project's Secrets Manager or Parameter Store variables.")
    image: EcrImage = Field(
        description="The image the build pushes, <account>.dkr.ecr.<region>.amazonaws.com/"
        "<repository>:<tag>; may be templated. Its digest is what the run tests.")
    aws: AwsApi = AwsApi()
    poll_interval_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10, description="Seconds between two looks at the build's status.")

    @model_validator(mode="after")
    def _env_references_only(self) -> CodeBuildSpec:
        for reference in iter_references(self.model_dump()):
            if not reference.startswith("env."):
                raise ValueError(f"${{{reference}}}: only ${{env.NAME}} can be used in a "
                                 "codebuild build (nothing else exists before the image)")
        return self
