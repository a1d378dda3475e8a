"""The SageMaker API calls the provider makes, through boto3 and the standard AWS credential
chain (common/aws.py): create and delete with tags, describe as found-or-not, a wait on the
endpoint's status, the tagged resources of the region, and `invoke_endpoint` timed. Every error
names its call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

from mlci_dagster.common.aws import (
    CALL_TIMEOUT_S,
    READ_TIMEOUT,
    AwsAccess,
    AwsError,
    aws_client,
    call_aws,
)

# The resource kinds a sandbox is made of, in the order they are created.
KINDS = ("model", "endpoint-config", "endpoint")


class SageMakerError(AwsError):
    """A SageMaker call that failed."""

    @property
    def not_found(self) -> bool:
        return self.code in ("ValidationException", "ResourceNotFound") and (
            "could not find" in str(self).lower())


@dataclass
class Invocation:
    """What `invoke_endpoint` answered: the model's status (200, or a ModelError's original
    status), the body, its content type, and how long the call took."""

    status: int
    body: bytes
    content_type: str
    latency_ms: float
    variant: str = ""
    error: str = ""


def tags_of(run_id: str, partition: str, expires_at: float, sandbox_id: str
            ) -> list[dict[str, str]]:
    return [{"Key": "mlci:run-id", "Value": run_id},
            {"Key": "mlci:partition", "Value": partition},
            {"Key": "mlci:expires-at", "Value": str(int(expires_at))},
            {"Key": "mlci:sandbox-id", "Value": sandbox_id},
            {"Key": "managed-by", "Value": "mlci"}]


class SageMakerClient:
    """sagemaker and sagemaker-runtime clients of one region (and endpoint URL)."""

    def __init__(self, access: AwsAccess, timeout_s: float = CALL_TIMEOUT_S,
                 invoke_timeout_s: float = 60.0) -> None:
        self.access = access
        self.api = aws_client("sagemaker", access, timeout_s)
        # One attempt: a retried invocation would hide its failure and skew its latency.
        self.runtime = aws_client("sagemaker-runtime", access, invoke_timeout_s, max_attempts=1)

    def _call(self, name: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        return call_aws(name, method, SageMakerError, **kwargs)

    # --- create --------------------------------------------------------------------------

    def create_model(self, name: str, image: str, role_arn: str, environment: dict[str, str],
                     model_data_url: str | None, tags: list[dict[str, str]]) -> str:
        container: dict[str, Any] = {"Image": image, "Environment": environment}
        if model_data_url:
            container["ModelDataUrl"] = model_data_url
        return self._call("CreateModel", self.api.create_model, ModelName=name,
                          PrimaryContainer=container, ExecutionRoleArn=role_arn,
                          Tags=tags)["ModelArn"]

    def create_endpoint_config(self, name: str, model: str, instance_type: str, count: int,
                               tags: list[dict[str, str]]) -> str:
        variant = {"VariantName": "AllTraffic", "ModelName": model,
                   "InstanceType": instance_type, "InitialInstanceCount": count,
                   "InitialVariantWeight": 1.0}
        return self._call("CreateEndpointConfig", self.api.create_endpoint_config,
                          EndpointConfigName=name, ProductionVariants=[variant],
                          Tags=tags)["EndpointConfigArn"]

    def create_endpoint(self, name: str, config: str, tags: list[dict[str, str]]) -> str:
        return self._call("CreateEndpoint", self.api.create_endpoint, EndpointName=name,
                          EndpointConfigName=config, Tags=tags)["EndpointArn"]

    # --- describe, wait, delete ----------------------------------------------------------

    def describe(self, kind: str, name: str) -> dict[str, Any] | None:
        """The resource's description, or None once SageMaker says it does not exist."""
        call, method, key = {
            "model": ("DescribeModel", self.api.describe_model, "ModelName"),
            "endpoint-config": ("DescribeEndpointConfig", self.api.describe_endpoint_config,
                                "EndpointConfigName"),
            "endpoint": ("DescribeEndpoint", self.api.describe_endpoint, "EndpointName"),
        }[kind]
        try:
            return self._call(call, method, **{key: name})
        except SageMakerError as exc:
            if exc.not_found:
                return None
            raise

    def delete(self, kind: str, name: str) -> bool:
        """Asks SageMaker to delete it; False if it was not there."""
        call, method, key = {
            "model": ("DeleteModel", self.api.delete_model, "ModelName"),
            "endpoint-config": ("DeleteEndpointConfig", self.api.delete_endpoint_config,
                                "EndpointConfigName"),
            "endpoint": ("DeleteEndpoint", self.api.delete_endpoint, "EndpointName"),
        }[kind]
        try:
            self._call(call, method, **{key: name})
            return True
        except SageMakerError as exc:
            if exc.not_found:
                return False
            raise

    def wait_endpoint(self, name: str, deadline: float, interval_s: float,
                      done: Callable[[dict[str, Any] | None], bool]) -> dict[str, Any] | None:
        """Describes the endpoint every `interval_s` until `done` says so or the deadline;
        returns the last description (None: it does not exist)."""
        while True:
            found = self.describe("endpoint", name)
            if done(found) or time.monotonic() >= deadline:
                return found
            time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))

    # --- what exists ---------------------------------------------------------------------

    def tagged(self, prefix: str, tag_key: str) -> Iterator[tuple[str, str, str, dict[str, str]]]:
        """(kind, name, arn, tags) of every model, endpoint config and endpoint in the region
        whose name starts with `prefix` and that carries the tag `tag_key`."""
        listings = (
            ("model", "ListModels", self.api.list_models, "Models", "ModelName", "ModelArn"),
            ("endpoint-config", "ListEndpointConfigs", self.api.list_endpoint_configs,
             "EndpointConfigs", "EndpointConfigName", "EndpointConfigArn"),
            ("endpoint", "ListEndpoints", self.api.list_endpoints, "Endpoints", "EndpointName",
             "EndpointArn"),
        )
        for kind, call, method, items, name_key, arn_key in listings:
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"NameContains": prefix, "MaxResults": 100}
                if token:
                    kwargs["NextToken"] = token
                page = self._call(call, method, **kwargs)
                for item in page.get(items, []):
                    name, arn = item[name_key], item[arn_key]
                    if not name.startswith(prefix):
                        continue  # NameContains matches anywhere in the name
                    tags = self.tags(arn)
                    if tag_key in tags:
                        yield kind, name, arn, tags
                token = page.get("NextToken")
                if not token:
                    break

    def tags(self, arn: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"ResourceArn": arn, "MaxResults": 100}
            if token:
                kwargs["NextToken"] = token
            try:
                page = self._call("ListTags", self.api.list_tags, **kwargs)
            except SageMakerError as exc:
                if exc.not_found or "Could not find" in str(exc):
                    return tags  # deleted between the listing and now
                raise
            tags.update({t["Key"]: t["Value"] for t in page.get("Tags", [])})
            token = page.get("NextToken")
            if not token:
                return tags

    # --- invoke --------------------------------------------------------------------------

    def invoke(self, endpoint: str, body: bytes, content_type: str, accept: str | None
               ) -> Invocation:
        """One `invoke_endpoint`. A ModelError (the container answered with an error) is an
        Invocation with the container's status; any other failure raises SageMakerError."""
        kwargs: dict[str, Any] = {"EndpointName": endpoint, "Body": body,
                                  "ContentType": content_type}
        if accept:
            kwargs["Accept"] = accept
        start = time.monotonic()
        try:
            response = self.runtime.invoke_endpoint(**kwargs)
            data = response["Body"].read()
        except ClientError as exc:
            latency_ms = (time.monotonic() - start) * 1000
            error = exc.response.get("Error", {})
            if error.get("Code") == "ModelError":
                return Invocation(int(exc.response.get("OriginalStatusCode") or 0),
                                  str(exc.response.get("OriginalMessage") or "").encode(),
                                  "", latency_ms, error=error.get("Message", ""))
            raise SageMakerError(f"InvokeEndpoint: {error.get('Code', '')}: "
                                 f"{error.get('Message', exc)}", "InvokeEndpoint",
                                 error.get("Code", "")) from exc
        except BotoCoreError as exc:
            raise SageMakerError(f"InvokeEndpoint: {type(exc).__name__}: {exc}",
                                 "InvokeEndpoint",
                                 READ_TIMEOUT if isinstance(exc, ReadTimeoutError) else ""
                                 ) from exc
        return Invocation(int(response["ResponseMetadata"]["HTTPStatusCode"]), data,
                          response.get("ContentType", ""), (time.monotonic() - start) * 1000,
                          variant=response.get("InvokedProductionVariant", ""))
