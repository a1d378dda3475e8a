"""Where any AWS API is reached, for the SageMaker provider and CodeBuild image builds alike:
the settings as the registry writes them (maybe `${env.NAME}`), resolved to an access (a region,
another endpoint), a boto3 client of any service that gives up in time, and a call whose error
names it and AWS's code."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

from mlci_dagster.common.templating import REFERENCE, TemplateError, render

CALL_TIMEOUT_S = 30.0
READ_TIMEOUT = "ReadTimeout"  # the code of a call that got no answer in time


class AwsError(Exception):
    """An AWS call that failed: `call` names it, `code` is AWS's error code ("" when the
    request never got an answer: a timeout, a refused connection)."""

    def __init__(self, message: str, call: str = "", code: str = "") -> None:
        super().__init__(message)
        self.call = call
        self.code = code


@dataclass(frozen=True)
class AwsAccess:
    """Where the API is: a region, and another endpoint (a VPC endpoint, a moto server)."""

    region: str
    endpoint_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AwsAccess:
        return cls(data["region"], data.get("endpoint_url") or None)


@dataclass(frozen=True)
class AwsSettings:
    """Which region and API endpoint, as the registry writes them (maybe `${env.NAME}`)."""

    region: str
    endpoint_url: str | None = None

    def resolve(self, environ: dict[str, str] | None = None) -> AwsAccess:
        """The settings with `${env.NAME}` filled in. An unset variable in `endpoint_url`
        means AWS itself; in `region` it raises TemplateError naming it (and no other
        variable: the environment is not listed)."""
        environ = dict(os.environ) if environ is None else environ
        values = []
        for field, value in (("region", self.region), ("endpoint_url", self.endpoint_url)):
            for reference in REFERENCE.findall(value or ""):
                root, _, name = reference.partition(".")
                if root != "env":
                    raise TemplateError(f"{field}: ${{{reference}}}: only ${{env.NAME}} can be "
                                        "used here")
                if name not in environ and field == "region":
                    raise TemplateError(f"{field}: environment variable {name} is not set")
            values.append(render(value, {"env": _defaulted(value, environ)}) if value else value)
        return AwsAccess(values[0], values[1] or None)


def _defaulted(value: str, environ: dict[str, str]) -> dict[str, str]:
    """`environ` with every variable `value` references and that is unset as ""."""
    names = [r.partition(".")[2] for r in REFERENCE.findall(value) if r.startswith("env.")]
    return {**{name: "" for name in names}, **environ}


def aws_client(service: str, access: AwsAccess, timeout_s: float = CALL_TIMEOUT_S,
               max_attempts: int = 4, signature_version: str | None = None) -> Any:
    """A boto3 client of `service` where `access` says, that gives up after `timeout_s`
    (`signature_version`: e.g. s3v4, which S3's presigned URLs need to carry an expiry)."""
    return boto3.client(service, region_name=access.region, endpoint_url=access.endpoint_url,
                        config=Config(connect_timeout=min(10.0, timeout_s),
                                      read_timeout=timeout_s,
                                      retries={"max_attempts": max_attempts,
                                               "mode": "standard"},
                                      signature_version=signature_version))


def call_aws(name: str, method: Callable[..., Any], error: type[AwsError] = AwsError,
             **kwargs: Any) -> Any:
    """`method(**kwargs)`; what boto3 raises becomes `error`, its message starting with the
    call's name and AWS's error code."""
    try:
        return method(**kwargs)
    except ClientError as exc:
        details = exc.response.get("Error", {})
        code = details.get("Code", "")
        raise error(f"{name}: {code}: {details.get('Message', exc)}", name, code) from exc
    except BotoCoreError as exc:
        code = READ_TIMEOUT if isinstance(exc, ReadTimeoutError) else ""
        raise error(f"{name}: {type(exc).__name__}: {exc}", name, code) from exc
