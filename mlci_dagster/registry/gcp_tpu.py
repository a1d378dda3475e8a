"""The registry's Google Cloud TPU fields: a sandbox as one TPU VM node (accelerator type,
runtime version, spot), reached over SSH, and the pipeline kind that runs a command on it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints

from mlci_dagster.common.templating import REFERENCE
from mlci_dagster.registry.base import (
    BilledResource,
    EnvName,
    Name,
    ReportingPipeline,
    SandboxBase,
    Seconds,
    StrictModel,
    TestReportSpec,
    matching_or_reference,
)


def _port_or_reference(value: int | str) -> int | str:
    if isinstance(value, int):
        if not 1 <= value <= 65_535:
            raise ValueError(f"expected a port between 1 and 65535 (got {value})")
        return value
    if value.isdigit():
        return _port_or_reference(int(value))
    if not REFERENCE.fullmatch(value):
        raise ValueError(f"expected a port number, or a ${{...}} reference (got {value!r})")
    return value


Project = Annotated[str, matching_or_reference(
    r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", "a Google Cloud project id such as my-project-123")]
Zone = Annotated[str, matching_or_reference(
    r"^[a-z]+-[a-z]+[0-9]+-[a-z]$", "a zone such as us-central2-b")]
ApiEndpoint = Annotated[str, matching_or_reference(
    r"^https?://[^\s/]+/?$", "an http:// or https:// host[:port] URL")]
AcceleratorType = Annotated[str, StringConstraints(pattern=r"^v[0-9][a-z0-9]*-[0-9]+$")]
RuntimeVersion = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
UserName = Annotated[str, matching_or_reference(r"^[a-z_][a-z0-9_-]{0,31}$",
                                                "a login name such as mlci")]
Port = Annotated[int | str, AfterValidator(_port_or_reference)]


class SshSpec(StrictModel):
    """How pipelines reach the VM: a user and a private key held in an environment variable."""

    user: UserName = Field(description="The login on the VM (its key must be authorized there, "
                                       "e.g. through the project's or the node's ssh-keys); "
                                       "may be a ${...} reference.")
    private_key_env: EnvName = Field(
        description="The environment variable holding the private key (OpenSSH or PEM; "
        "Ed25519, ECDSA or RSA): a secret, redacted everywhere.")
    port: Port = Field(default=22, description="The VM's SSH port; may be a ${...} reference.")
    connect_timeout_s: Seconds = Field(
        default=30, description="How long one connection attempt may take.")


class VmService(StrictModel):
    """A port served on the VM, reached as `${services.<name>.url}` and by ui_smoke routes."""

    name: Name
    port: Annotated[int, Field(ge=1, le=65_535)]
    scheme: Literal["http", "https"] = "http"


class TpuVmSandbox(SandboxBase):
    """A Cloud TPU VM node per sandbox, labelled with the run, the partition and the expiry,
    waited to READY and to SSH, and always deleted."""

    provider: Literal["gcp-tpu-vm"]
    project: Project = Field(description="The Google Cloud project; may be templated "
                                         "(${env.GCP_PROJECT}).")
    zone: Zone = Field(description="The zone holding the accelerator type, e.g. us-central2-b.")
    accelerator_type: AcceleratorType = Field(description="e.g. v4-8, v5litepod-8, v6e-8.")
    runtime_version: RuntimeVersion = Field(description="e.g. tpu-ubuntu2204-base.")
    spot: bool = Field(default=False, description="A spot VM: cheaper, and may be preempted "
                                                  "(a preempted run fails as infra).")
    retries_on_preemption: Annotated[int, Field(ge=0, le=5)] = Field(
        default=0, description="How many times Dagster retries the lifecycle when the node is "
        "preempted (each attempt is recorded; a preemption is infra, never a regression).")
    external_ip: bool = Field(
        default=False, description="Give the VM an external IP and reach it there (a runner "
        "outside the VPC); default: its internal IP.")
    api_endpoint: ApiEndpoint | None = Field(
        default=None, description="Another Cloud TPU API endpoint (a loopback emulator over "
        "http://, which is reached without credentials); may be templated. Default: Google's, "
        "with Application Default Credentials.")
    ssh: SshSpec
    state_poll_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=15, description="How often a running pipeline checks that the node is still "
        "READY (not PREEMPTED).")
    services: list[VmService] = Field(
        default=[], description="Ports on the VM that ${services.<name>.url} and ui_smoke "
        "routes reach.")

    def billed_resources(self) -> list[BilledResource]:
        return [BilledResource(self.accelerator_type, 1, self.spot, "sandbox.accelerator_type")]

    def preemption_retries(self) -> int:
        return self.retries_on_preemption


class SshCommandPipeline(ReportingPipeline):
    """A command on the TPU VM over SSH, in the login's home directory, in a process group of
    its own that the timeout kills whole; passes on the expected exit code and output, as a
    `command` pipeline does. The test reports it writes on the VM are fetched over SFTP."""

    kind: Literal["ssh_command"]
    name: Name
    command: Annotated[list[str], Field(min_length=1)] | Annotated[str, Field(min_length=1)] = (
        Field(description="An argv (quoted for the remote shell) or a shell command line."))
    env: dict[EnvName, str] = Field(
        default={}, description="Variables for the command, after the engine's; templated. "
        "${env.NAME} values reach the VM: they stay out of logs, not off the VM.")
    expect_exit_code: int = 0
    expect_output: list[str] = Field(default=[], description="Substrings the output must hold.")
    outputs: dict[EnvName, str] = Field(
        default={}, description="Values to capture: a regex with one group, per stdout line.")
    timeout_s: Seconds | None = Field(
        default=None, description="Default: what is left of timeouts.pipeline_runs_s.")
    reports: list[TestReportSpec] = Field(
        default=[], description="The test reports it writes on the VM (JUnit XML), fetched over "
        "SFTP when it ends, pass or fail: each path absolute, or relative to the login's home "
        "directory (where the command runs); `*`, `?` and `[...]` in any path component, no "
        "`**`. Not ${sandbox.workdir}: that is on the runner, not the VM.")
