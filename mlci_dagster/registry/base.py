"""The registry's building blocks: names, durations and the strict model every part uses."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from mlci_dagster.common.templating import REFERENCE

# A config name is a Dagster partition key: Dagster does not check dynamic keys, so we do.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RULE = ("at most 63 characters: lowercase letters, digits and '-', starting and ending "
             "with a letter or digit")


def valid_name(value: str) -> str:
    """`value` if it is a name (see NAME_RULE); ValueError saying what a name is otherwise."""
    if not re.fullmatch(NAME_PATTERN, value):
        shown = f"{len(value)} characters" if len(value) > 63 else repr(value)
        raise ValueError(f"expected a name of {NAME_RULE} (got {shown})")
    return value


# Every name says what a name is, rather than pydantic's bare regex; editors still get it.
Name = Annotated[str, AfterValidator(valid_name),
                 WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "maxLength": 63})]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Seconds = Annotated[float, Field(gt=0, le=86_400)]
Argv = Annotated[list[str], Field(min_length=1)]
# The one table of sandbox providers: each name, as `sandbox.provider` and a reservation's
# `provider` say it, and where its class is ("module:Class"; providers/base.py imports it on
# first use, so the core never imports a provider's SDK).
PROVIDERS = {
    "local": "mlci_dagster.providers.local:LocalProvider",
    "kubernetes": "mlci_dagster.providers.kubernetes:KubernetesProvider",
    "aws-sagemaker": "mlci_dagster.providers.aws:SageMakerProvider",
    "gcp-tpu-vm": "mlci_dagster.providers.gcp_tpu:TpuVmProvider",
}
PROVIDER_NAMES = tuple(PROVIDERS)


def _relative_glob(value: str) -> str:
    if not value or value.startswith("/") or ".." in value.split("/"):
        raise ValueError("expected a glob relative to the repository root, without '..' "
                         f"(got {value!r})")
    return value


# A glob over the files of the git repository holding the registry, from its top level.
RepoGlob = Annotated[str, AfterValidator(_relative_glob)]


def matching_or_reference(pattern: str, expected: str) -> AfterValidator:
    """A string that matches `pattern`, or that holds a `${...}` reference (resolved later)."""

    def check(value: str) -> str:
        if not (re.fullmatch(pattern, value) or REFERENCE.search(value)):
            raise ValueError(f"expected {expected}, or a ${{...}} reference (got {value!r})")
        return value

    return AfterValidator(check)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TestReportSpec(StrictModel):
    """A test report a pipeline writes, collected when it ends, pass or fail."""

    __test__ = False  # a name pytest would otherwise collect

    format: Literal["junit"] = Field(
        default="junit", description="JUnit XML, as pytest --junitxml, Maven Surefire, JUnit 5, "
                                     "gotestsum or ScalaTest write it.")
    path: str = Field(description="Where it is written (a glob for several), where the pipeline "
                                  "runs: a command's relative to the sandbox's work directory "
                                  "(${sandbox.workdir}), an ssh_command's to its login's home "
                                  "on the VM, a k8s_job's absolute, in its pod.")


class PipelineBase(StrictModel):
    """What every pipeline kind has: the fields that name a file under the registry root."""

    file_fields: ClassVar[tuple[str, ...]] = ()

    def named_files(self, at: str) -> list[tuple[str, str]]:
        """(field, path) of each registry file the pipeline at `at` (`pipelines[0]`) reads."""
        return [(f"{at}.{name}", value) for name in self.file_fields
                if (value := getattr(self, name))]


class ReportingPipeline(PipelineBase):
    """A pipeline kind that can write test reports: `command` (on this machine), `k8s_job` (in
    its pod), `ssh_command` (on the VM). Its provider fetches them (`Provider.report_files`)."""

    reports: list[TestReportSpec] = Field(
        default=[], description="The test reports it writes: each test's result is recorded.")


class BilledResource(NamedTuple):
    """Something a sandbox holds that a cloud bills by the hour: its type (a rate's key under
    `costs.hourly_usd`), how many, whether spot, and the field of the config that names it."""

    type: str
    count: int
    spot: bool
    field: str


class SandboxBase(StrictModel):
    """What every provider's sandbox spec has: its pool, its time to live and what it bills."""

    pool: Name | None = Field(
        default=None, description="The pool (a provider or a hardware reservation) whose limit "
        "this sandbox counts against; default: the provider's name.")
    reservation: Name | None = Field(
        default=None, description="The reservation (mlci.yaml `reservations:`) whose capacity "
        "this sandbox takes a lease on; it is then the sandbox's pool too.")
    ttl_s: Seconds = 3600

    @model_validator(mode="after")
    def _pool_or_reservation(self) -> SandboxBase:
        if self.pool is not None and self.reservation is not None:
            raise ValueError("pool: a sandbox bound to a reservation counts against its "
                             "capacity (expected `pool` or `reservation`, not both)")
        return self

    def billed_resources(self) -> list[BilledResource]:
        """What a cloud bills while the sandbox exists; nothing for a sandbox on this machine or
        on a cluster that is paid for anyway."""
        return []

    def named_files(self) -> list[tuple[str, str]]:
        """(field, path under the registry root) of every registry file the sandbox reads."""
        return []

    def with_engine(self, engine: Any) -> Self:
        """The sandbox as it runs on `engine` (its registry.models.EngineSpec): the engine's
        part (a database, say) started first, where the provider has one."""
        return self

    def preemption_retries(self) -> int:
        """How many times the lifecycle is tried again when the machine is preempted."""
        return 0
