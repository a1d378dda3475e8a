"""Typed, strict models of the registry's YAML: the root settings file and one file per config."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from mlci_dagster.common.redact import looks_like_credential
from mlci_dagster.registry.aws import CodeBuildSpec, SageMakerInvokePipeline, SageMakerSandbox
from mlci_dagster.registry.base import (
    PROVIDER_NAMES,
    Argv,
    EnvName,
    Name,
    PipelineBase,
    RepoGlob,
    ReportingPipeline,
    SandboxBase,
    Seconds,
    StrictModel,
)
from mlci_dagster.registry.gcp_tpu import SshCommandPipeline, TpuVmSandbox
from mlci_dagster.registry.kubernetes import (
    K8sJobPipeline,
    K8sResourcePipeline,
    KubernetesSandbox,
    ManifestPath,
)
from mlci_dagster.registry.reservations import NightlySettings, ReservationSpec
from mlci_dagster.vocabulary import STAGES, Stage

# --- image ---------------------------------------------------------------------------------


class BuildSpec(StrictModel):
    """How the image is built: exactly one of a command on this machine or a CodeBuild
    project."""

    command: Argv | None = Field(
        default=None, description="A build on this machine, run in the registry root with "
        "MLCI_IMAGE_DIR and MLCI_IMAGE_HASH set.")
    codebuild: CodeBuildSpec | None = Field(
        default=None, description="A build by an AWS CodeBuild project that pushes to ECR.")
    inputs: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="Globs relative to the registry root; their content keys the "
        "build cache. Required with `command`. With `codebuild` optional: given, an unchanged "
        "key (inputs, the codebuild block, its resolved source_version) reuses the digest "
        "built before; not given, every run builds (the source is the project's, which this "
        "machine cannot hash).")

    @model_validator(mode="after")
    def _one_builder(self) -> BuildSpec:
        if (self.command is None) == (self.codebuild is None):
            raise ValueError("expected exactly one of 'command' (a build on this machine) or "
                             "'codebuild' (an AWS CodeBuild project)")
        if self.command is not None and self.inputs is None:
            raise ValueError("inputs: required with 'command' (globs whose content keys the "
                             "build cache)")
        return self


class ImageSpec(StrictModel):
    ref: str | None = Field(default=None, description="A prebuilt image reference.")
    build: BuildSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageSpec:
        if (self.ref is None) == (self.build is None):
            raise ValueError("expected exactly one of 'ref' or 'build'")
        return self


# --- sandbox -------------------------------------------------------------------------------


class HttpProbe(StrictModel):
    path: str = "/"
    expect_status: int = 200


class ProbeSpec(StrictModel):
    """How to tell a service is ready: exactly one of http, tcp or command."""

    http: HttpProbe | None = None
    tcp: bool | None = None
    command: Argv | None = None
    timeout_s: Seconds | None = Field(default=None, description="Default: timeouts.sandbox_s.")
    interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2

    @model_validator(mode="after")
    def _one_probe(self) -> ProbeSpec:
        chosen = [k for k in ("http", "tcp", "command") if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("expected exactly one of 'http', 'tcp' or 'command'")
        return self


class ServiceSpec(StrictModel):
    name: Name
    command: Argv
    env: dict[EnvName, str] = {}
    ready: ProbeSpec


class LocalSandbox(SandboxBase):
    """Services as local processes, each in its own process group (the embedded default)."""

    provider: Literal["local"] = "local"
    services: list[ServiceSpec] = []

    def with_engine(self, engine: EngineSpec) -> LocalSandbox:
        return self.model_copy(update={"services": [*engine.services, *self.services]})


def _provider_of(value: Any) -> str:
    provider = value.get("provider", "local") if isinstance(value, dict) else value.provider
    return provider if isinstance(provider, str) else repr(provider)


# `sandbox.provider` picks the member; each provider's fields are validated strictly.
SandboxSpec = Annotated[
    Annotated[LocalSandbox, Tag("local")] | Annotated[KubernetesSandbox, Tag("kubernetes")]
    | Annotated[SageMakerSandbox, Tag("aws-sagemaker")]
    | Annotated[TpuVmSandbox, Tag("gcp-tpu-vm")],
    Discriminator(_provider_of, custom_error_type="provider", custom_error_message=(
        f"expected one of: {', '.join(PROVIDER_NAMES)}")),
]


# --- root settings -------------------------------------------------------------------------


class EngineSpec(StrictModel):
    """A workflow engine: the static partition axis. Its variables feed the sandbox spec."""

    description: str = ""
    variables: dict[EnvName, str] = {}
    services: list[ServiceSpec] = Field(
        default=[], description="Started in every local sandbox on this engine (e.g. its "
        "database).")
    manifests: list[ManifestPath] = Field(
        default=[], description="Applied first in every kubernetes sandbox on this engine "
        "(e.g. its database), files under the registry root.")


class HistorySettings(StrictModel):
    """Thresholds of the history analysis; the defaults suit a nightly matrix."""

    stale_after_h: Annotated[float, Field(gt=0)] = Field(
        default=24, description="A partition whose last result is older is STALE.")
    alert_open_after: Annotated[int, Field(ge=1)] = Field(
        default=2, description="Consecutive failures that open an alert.")
    alert_close_after: Annotated[int, Field(ge=1)] = Field(
        default=2, description="Consecutive passes that close it.")
    flaky_window: Annotated[int, Field(ge=2)] = Field(
        default=20, description="Recent runs examined for flakiness.")
    slowdown_baseline_runs: Annotated[int, Field(ge=2)] = Field(
        default=20, description="Trailing runs that form a duration or metric baseline.")
    slowdown_min_samples: Annotated[int, Field(ge=2)] = Field(
        default=5, description="Fewer baseline samples than this: no slowdown is reported.")
    slowdown_confirm_runs: Annotated[int, Field(ge=1)] = Field(
        default=2, description="Consecutive latest runs that must all be slow.")
    slowdown_mad_k: Annotated[float, Field(gt=0)] = Field(
        default=3.0, description="How many scaled MADs above the median counts as slow.")
    slowdown_min_relative: Annotated[float, Field(ge=0)] = Field(
        default=0.2, description="And at least this relative change (0.2 = 20%).")
    outage_min_partitions: Annotated[int, Field(ge=2)] = Field(
        default=5, description="A day's batch is an outage only if at least this many "
        "partitions ran in it (and outage_min_fraction of them failed); smaller batches are "
        "judged partition by partition.")
    outage_min_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="The share of a batch's partitions that must have failed (every "
        "run of theirs that day) for its failures to count as an outage (1.0 = all).")


# A registry as image refs name it: host[:port], e.g. 127.0.0.1:5000 or <acct>.dkr.ecr.<region>...
RegistryHost = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")]


class ImageRegistrySpec(StrictModel):
    """How to reach one image registry, so that its tags can be watched and resolved."""

    kind: Literal["oci", "ecr"] = Field(
        description="oci: the OCI distribution API (Docker Registry, Harbor, GHCR); "
                    "ecr: Amazon ECR through boto3, credentials from the AWS_* environment.")
    insecure: bool = Field(
        default=False, description="oci only: plain HTTP instead of HTTPS (a loopback registry).")
    token_env: EnvName | None = Field(
        default=None, description="oci only: environment variable holding a bearer token; "
                                  "it must also be listed under secrets.")
    region: str | None = Field(
        default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$",
        description="ecr only. Default: the region in the host name.")
    endpoint_url: str | None = Field(
        default=None, description="ecr only: another ECR API endpoint (a VPC endpoint, a test "
                                  "server).")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ImageRegistrySpec:
        other = ("region", "endpoint_url") if self.kind == "oci" else ("insecure", "token_env")
        used = [name for name in other if getattr(self, name) not in (None, False)]
        if used:
            raise ValueError(f"{', '.join(used)}: not a field of a '{self.kind}' registry")
        return self


class PoolSpec(StrictModel):
    """A reservation: at most `limit` lifecycles of its configs run at once."""

    limit: Annotated[int, Field(ge=1)]
    description: str = ""


# A billed resource type as clouds name them: ml.m5.large, v5litepod-8, n2-standard-4.
ResourceType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class CostSettings(StrictModel):
    """What each billed resource type costs: a run's cost is the resource-seconds its sandbox
    held times these rates. A sandbox on this machine (local) or a cluster (kubernetes) bills
    nothing here."""

    hourly_usd: dict[ResourceType, Annotated[float, Field(ge=0)]] = Field(
        default={}, description="USD per hour of one resource, on demand, by type "
        "(ml.m5.large: 0.115, v5litepod-1: 1.2).")
    spot_multiplier: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="A spot (preemptible) resource costs its rate times this, "
        "e.g. 0.3 for 70% off.")


class BudgetSettings(StrictModel):
    """A monthly cap: a run whose month would exceed it is refused before anything is created."""

    monthly_usd: Annotated[float, Field(gt=0)] = Field(
        description="USD per calendar month (UTC) for every run of this registry.")


class CulpritSearchSettings(StrictModel):
    """How a regression whose range spans several commits is bisected to the commit that
    broke it: reruns of the failing partition at commits of the range, as Dagster runs."""

    automatic: bool = Field(
        default=True, description="Start a search when a partition first fails with a product "
        "or timeout failure at a commit whose last pass was at an older one (the culprit_search "
        "sensor). Either way `mlci culprit find` and the find_culprit job start one by hand.")
    max_runs: Annotated[int, Field(ge=3, le=100)] = Field(
        default=10, description="The most reruns one search may start, verification included; "
        "a search that could need more is refused before its first run.")
    max_width: Annotated[int, Field(ge=1, le=16)] = Field(
        default=3, description="The most reruns of one search at once (its pool's limit, when "
        "lower, bounds it too): k at once splits the range k+1 ways per round.")


Reruns = Annotated[int, Field(ge=0, le=5)]


class S3StoreSpec(StrictModel):
    """An S3 bucket and prefix for the artifacts, reached with boto3's standard credential
    chain (environment, profile, instance role: never a key in the registry)."""

    bucket: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")] = \
        Field(description="The bucket (it must exist).")
    prefix: Annotated[str, StringConstraints(max_length=200, pattern=r"^([^/].*/)?$")] = Field(
        default="mlci/", description="Before every key: empty, or ending in '/'.")
    region: str = Field(default="us-east-1", description="May be ${env.NAME}.")
    endpoint_url: str | None = Field(
        default=None, description="Another S3 endpoint (MinIO, moto, a VPC endpoint); may be "
        "${env.NAME}.")


ArtifactKind = Literal["log", "bundle", "screenshot", "report", "site"]


class ArtifactSettings(StrictModel):
    """Where each run's evidence (its logs, debug bundle, screenshots, test reports) is
    uploaded after teardown, redacted as it is on disk."""

    s3: S3StoreSpec | None = Field(
        default=None, description="An S3 bucket; default: the directory "
        "$DAGSTER_HOME/mlci/artifacts.")
    max_mb: Annotated[float, Field(gt=0, le=5000)] = Field(
        default=100, description="An artifact larger than this is stored truncated, with a "
        "note saying so at its end.")
    screenshots: bool = Field(
        default=True, description="Upload the browser checks' screenshots (an image cannot be "
        "redacted: turn this off where a page may show a secret; a route's own "
        "`upload_screenshot: false` turns off only its own).")
    public_url: Annotated[str, StringConstraints(pattern=r"^https?://")] | None = Field(
        default=None, description="Where readers fetch the store's objects (a web server or CDN "
        "in front of the bucket's prefix, or of the directory): links are this URL and the "
        "key. Unset: S3 links are presigned, local ones file:// (this machine only).")
    link_lifetime_h: Annotated[float, Field(gt=0, le=168)] = Field(
        default=168, description="How long a presigned link works (S3 without public_url); "
        "SigV4 allows 7 days at most.")
    retention_days: dict[ArtifactKind, Annotated[float, Field(gt=0)]] = Field(
        default={}, description="Kind (log, bundle, screenshot, report, site) -> days its "
        "objects are kept; a kind left out is kept for ever. `mlci artifacts prune` and the "
        "artifact_retention sensor delete older objects, never those an open regression or an "
        "active quarantine points at.")


class QuarantineSettings(StrictModel):
    """When the notifier proposes quarantining a flaky partition (a proposal only: `mlci
    quarantine add` quarantines, into the registry's quarantine.yaml)."""

    propose_above: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=0.3, description="Propose it once its transition rate (flips between pass and "
        "fail over the history's flaky_window) reaches this; null: never.")
    days: Annotated[int, Field(ge=1, le=365)] = Field(
        default=14, description="The expiry a proposal suggests, in days from its day.")


class TierSpec(StrictModel):
    """A tier: the configs that list it under `tiers:`, what starts their runs and how much of
    them a run takes."""

    trigger: Literal["pull_request", "merge", "nightly", "label"] = Field(
        description="pull_request: a pull request opened or updated; merge: a merge to the "
        "default branch; nightly: the nightly schedule; label: a label put on a pull request.")
    label: Annotated[str, StringConstraints(min_length=1, max_length=50)] | None = Field(
        default=None, description="The pull-request label that starts the tier: with trigger "
        "'label' only, and required there.")
    selection: Literal["all", "changed"] = Field(
        default="all", description="all: every partition of the tier; changed: those whose "
        "files the change touched (`mlci plan`), every one when mlci.yaml or the harness did.")
    representatives: bool = Field(
        default=False, description="One partition per equivalence class (its first config by "
        "name), standing for the others of the class.")
    reruns: Reruns = Field(
        default=0, description="How many times a run of the tier that fails for the product or "
        "a timeout is rerun on the same image and commit: a failure that passes on rerun is "
        "flaky (no regression, no issue), one that fails every attempt is confirmed. A "
        "config's own `reruns` wins.")
    description: str = ""

    @model_validator(mode="after")
    def _label_with_label_trigger(self) -> TierSpec:
        if self.trigger == "label" and self.label is None:
            raise ValueError("label: required with trigger 'label' (expected the pull-request "
                             "label that starts the tier)")
        if self.trigger != "label" and self.label is not None:
            raise ValueError(f"label: only with trigger 'label' (trigger is '{self.trigger}')")
        return self


class PlanSettings(StrictModel):
    """What `mlci plan` counts as a change to every config."""

    select_all_on: list[RepoGlob] = Field(
        default=["mlci_dagster/**"], description="Globs from the repository's top level whose "
        "change selects every partition of the tier (default: the harness's own code); a change "
        "to mlci.yaml always does.")


GitRef = Annotated[str, StringConstraints(min_length=1, max_length=200,
                                         pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")]


class RepositorySpec(StrictModel):
    """The git repository the commit sensor polls for new commits (`git ls-remote`)."""

    url: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="A local path (relative to the registry root) or a URL git can fetch.")
    branches: Annotated[list[GitRef], Field(min_length=1)] = Field(
        description="Watched branches: a new commit on one runs the tiers with trigger "
        "'merge'. The first is the base pull requests are planned against.")
    pull_requests: bool = Field(
        default=False, description="Also watch refs/pull/<n>/head: a new head runs the tiers "
        "with trigger 'pull_request'.")
    poll_interval_s: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=60, description="Seconds between two polls of the repository.")


class Settings(StrictModel):
    """The registry's root file: engines, secret and public variable names and defaults for
    every config."""

    engines: Annotated[dict[Name, EngineSpec], Field(min_length=1)]
    pools: dict[Name, PoolSpec] = Field(
        default={}, description="Concurrency limits per pool, enforced by Dagster's run queue.")
    secrets: list[EnvName] = Field(
        default=[], description="Environment variables whose values are redacted everywhere. "
        "Every variable the registry references as ${env.NAME}, and every one whose name looks "
        "like a credential, is redacted too, listed or not."
    )
    public_env: list[EnvName] = Field(
        default=[], description="Variables referenced as ${env.NAME} whose values are safe to "
        "show (a HOME, a region): not redacted. A name that looks like a credential (a word "
        "PASSWORD, TOKEN, SECRET, KEY...) may not be listed.")
    history: HistorySettings = HistorySettings()
    image_registries: dict[RegistryHost, ImageRegistrySpec] = Field(
        default={}, description="Registries whose tags the image_poll sensor watches and the "
                                "image stage resolves, by host[:port] as image refs write it.")
    image_poll_interval_s: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=60, description="Seconds between two polls of the image registries.")
    costs: CostSettings = CostSettings()
    budget: BudgetSettings | None = None
    tiers: dict[Name, TierSpec] = Field(
        default={}, description="The tiers configs may name. None declared: a config's tiers "
        "are free labels that `--tier` filters on, and `mlci plan --tier T` selects the "
        "changed configs among those naming T.")
    plan: PlanSettings = PlanSettings()
    repository: RepositorySpec | None = Field(
        default=None, description="The git repository whose commits and pull requests start "
        "the merge, pull_request and label tiers.")
    culprit_search: CulpritSearchSettings = CulpritSearchSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    artifacts: ArtifactSettings = ArtifactSettings()
    ui_base_url: Annotated[str, StringConstraints(pattern=r"^https?://")] | None = Field(
        default=None, description="Where people open the Dagster UI, for the links to runs in "
        "reports, grids, notifications and statuses; $MLCI_DAGSTER_URL wins when set. Default: "
        "http://127.0.0.1:3000.")
    nightly: NightlySettings = Field(
        default=NightlySettings(), description="When the nightly schedule starts.")
    reservations: list[ReservationSpec] = Field(
        default=[], description="Reserved hardware: capacity shared through leases between "
        "test runs and, by day, a deployment for people. Configs bind with "
        "sandbox.reservation.")

    def reservation(self, name: str) -> ReservationSpec:
        return next(r for r in self.reservations if r.name == name)

    @model_validator(mode="after")
    def _public_env_holds_no_secret(self) -> Settings:
        for i, name in enumerate(self.public_env):
            if looks_like_credential(name):
                raise ValueError(f"public_env[{i}]: '{name}' looks like a credential, whose "
                                 "value is always redacted (expected a name without a word "
                                 "PASSWORD, PASSWD, PASS, SECRET, TOKEN or KEY)")
            if name in self.secrets:
                raise ValueError(f"public_env[{i}]: '{name}' is also listed under secrets "
                                 "(expected one or the other)")
        return self

    @model_validator(mode="after")
    def _tokens_are_secrets(self) -> Settings:
        for host, spec in self.image_registries.items():
            if spec.token_env and spec.token_env not in self.secrets:
                raise ValueError(f"image_registries.{host}.token_env: '{spec.token_env}' is not "
                                 "listed under secrets (expected there, so it is redacted)")
        return self


# --- pipelines -----------------------------------------------------------------------------


class CommandPipeline(ReportingPipeline):
    """A process in the sandbox: passes on the expected exit code and output."""

    kind: Literal["command"]
    name: Name
    command: Argv
    env: dict[EnvName, str] = {}
    expect_exit_code: int = 0
    expect_output: list[str] = Field(default=[], description="Substrings the output must hold.")
    outputs: dict[EnvName, str] = Field(
        default={}, description="Values to capture: a regex with one group, per stdout line."
    )
    timeout_s: Seconds | None = Field(
        default=None, description="Default: what is left of timeouts.pipeline_runs_s."
    )


class HttpRequest(StrictModel):
    method: Literal["GET", "POST", "PUT"] = "POST"
    url: str
    json_body: Any = Field(default=None, alias="json")
    headers: dict[str, str] = {}


class SubmitPollPipeline(PipelineBase):
    """Submit a job over HTTP, then poll its status until a terminal state (Ray Jobs API shape)."""

    kind: Literal["submit_poll"]
    name: Name
    submit: HttpRequest
    id_field: str = Field(description="Dotted path of the job id in the submit response.")
    poll_url: str = Field(description="May reference ${id}.")
    status_field: str = "status"
    success_states: Annotated[list[str], Field(min_length=1)]
    failure_states: list[str] = []
    logs_url: str | None = Field(default=None, description="Fetched for the error summary.")
    logs_field: str | None = None
    outputs: dict[EnvName, str] = Field(
        default={}, description="Values to capture: dotted paths in the final poll response."
    )
    interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    timeout_s: Seconds | None = Field(
        default=None, description="Default: what is left of timeouts.pipeline_runs_s."
    )


Pipeline = Annotated[
    CommandPipeline | SubmitPollPipeline | K8sJobPipeline | K8sResourcePipeline
    | SageMakerInvokePipeline | SshCommandPipeline,
    Field(discriminator="kind"),
]
# Pipeline kinds that only a provider can run, and which one.
PROVIDER_PIPELINE_KINDS = {"k8s_job": "kubernetes", "k8s_resource": "kubernetes",
                           "sagemaker_invoke": "aws-sagemaker", "ssh_command": "gcp-tpu-vm"}


# --- UI smoke ------------------------------------------------------------------------------


class RouteCheck(StrictModel):
    """One HTTP route: status, content and JSON fields, since an SPA answers 200 everywhere."""

    # Left out of dumps (the config id): routes from before kinds existed keep their ids.
    kind: Literal["http"] | None = Field(default=None, exclude=True,
                                         description="http (the default).")
    service: Name
    path: str
    expect_status: int = 200
    contains: list[str] = []
    json_equals: dict[str, Any] = Field(
        default={}, description="Dotted path in the JSON response -> expected value."
    )
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 10


class BrowserWait(StrictModel):
    """What the app's JavaScript renders once the page works: exactly one of a CSS selector or
    a text."""

    selector: str | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _one(self) -> BrowserWait:
        if (self.selector is None) == (self.text is None):
            raise ValueError("expected exactly one of 'selector' or 'text'")
        return self


class BrowserRoute(StrictModel):
    """One page loaded in headless Chromium: it must render what `wait_for` names, show the
    `contains` texts, and log no console error beyond `allow_console`; its load time and a
    screenshot are kept."""

    kind: Literal["browser"]
    service: Name
    path: str = "/"
    wait_for: BrowserWait
    contains: list[str] = Field(default=[], description="Texts the rendered page shows.")
    allow_console: list[str] = Field(
        default=[], description="Regular expressions of console errors that do not fail the "
        "check (a favicon 404, a known deprecation).")
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30
    # Left out of dumps (the config id): where its screenshot goes changes nothing it tests.
    upload_screenshot: bool = Field(
        default=True, exclude=True, description="Upload its screenshot to the artifact store, "
        "and put it in the debug bundle (an image cannot be redacted: turn this off where the "
        "page may show a secret; the screenshot then stays on the machine that ran it).")

    @field_validator("allow_console")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for i, pattern in enumerate(values):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"[{i}]: not a regular expression ({exc})") from exc
        return values


def _route_kind(value: Any) -> str:
    kind = value.get("kind", "http") if isinstance(value, dict) else (value.kind or "http")
    return kind if isinstance(kind, str) else repr(kind)


# `kind` picks the member: http (the default) or browser.
Route = Annotated[
    Annotated[RouteCheck, Tag("http")] | Annotated[BrowserRoute, Tag("browser")],
    Discriminator(_route_kind, custom_error_type="route_kind",
                  custom_error_message="expected kind http or browser"),
]


class UiSmokeSpec(StrictModel):
    routes: list[Route] = []


# --- the config ----------------------------------------------------------------------------


class MetricSpec(StrictModel):
    """A number a pipeline outputs, and which way is better."""

    source: str = Field(pattern=r"^[a-z0-9-]+\.[A-Za-z0-9_]+$",
                        description="<pipeline>.<output>")
    direction: Literal["lower_is_better", "higher_is_better"]


# Per-stage settings derive from the stage list: a new stage gets its timeout and owner here.
DEFAULT_TIMEOUTS_S: dict[Stage, float] = {
    Stage.IMAGE: 1800, Stage.SANDBOX: 300, Stage.PIPELINE_RUNS: 3600, Stage.UI_SMOKE: 300,
    Stage.TEARDOWN: 60,
}


class _TimeoutsBase(StrictModel):
    def for_stage(self, stage: Stage) -> float:
        return getattr(self, f"{stage}_s")

    @property
    def lifecycle_s(self) -> float:
        """The longest a whole lifecycle may take: every stage's timeout, end to end."""
        return sum(self.for_stage(stage) for stage in STAGES)


Timeouts = create_model(
    "Timeouts", __base__=_TimeoutsBase, __doc__="Seconds each stage may take.",
    **{f"{stage}_s": (Seconds, DEFAULT_TIMEOUTS_S[stage]) for stage in STAGES},
)


class _OwnersBase(StrictModel):
    default: str

    def for_stage(self, stage: Stage | str) -> str:
        return getattr(self, str(stage)) or self.default


Owners = create_model(
    "Owners", __base__=_OwnersBase,
    __doc__="Who to call when a stage breaks; `default` covers stages not named.",
    **{str(stage): (str | None, None) for stage in STAGES},
)


class TestConfig(StrictModel):
    """One test configuration: a partition on every engine it applies to."""

    __test__ = False  # not a pytest test class

    name: Name
    description: str = ""
    owners: Owners
    engines: Annotated[list[Name], Field(min_length=1)] | None = Field(
        default=None, description="Default: every engine."
    )
    tiers: list[Name] = Field(
        default=["nightly"], description="Tiers declared in mlci.yaml that run this config "
        "(free labels when mlci.yaml declares none).")
    paths: list[RepoGlob] = Field(
        default=[], description="Globs from the top level of the git repository holding the "
        "registry whose change selects this config in `mlci plan`. Its own file, its image "
        "build inputs and the manifests and payload files it names count without being listed.")
    class_: Name | None = Field(
        default=None, alias="class", description="Its equivalence class, instead of the "
        "fingerprint of what decides its behaviour: configs of one class on one engine are "
        "interchangeable, and a tier with `representatives` runs one of them.")
    reruns: Reruns | None = Field(
        default=None, description="How many times its failing run (product or timeout) is "
        "rerun on the same image and commit, whatever its tier; default: its run's tier's "
        "`reruns`, else none.")
    image: ImageSpec
    sandbox: SandboxSpec = LocalSandbox()
    pipelines: Annotated[list[Pipeline], Field(min_length=1)]
    ui_smoke: UiSmokeSpec = UiSmokeSpec()
    timeouts: Timeouts = Timeouts()
    metrics: dict[EnvName, MetricSpec] = Field(
        default={}, description="Numeric pipeline outputs tracked in history for slowdowns."
    )

    def named_files(self) -> list[tuple[str, str]]:
        """(field, path under the registry root) of every registry file its sandbox and its
        pipelines read: what the loader checks exists and a plan watches for changes."""
        return [*self.sandbox.named_files(), *(
            f for i, p in enumerate(self.pipelines) for f in p.named_files(f"pipelines[{i}]"))]

    @model_validator(mode="after")
    def _consistent(self) -> TestConfig:
        _unique("sandbox.services", [s.name for s in self.sandbox.services])
        _unique("pipelines", [p.name for p in self.pipelines])
        for i, pipeline in enumerate(self.pipelines):
            needs = PROVIDER_PIPELINE_KINDS.get(pipeline.kind, self.sandbox.provider)
            if needs != self.sandbox.provider:
                raise ValueError(f"pipelines[{i}].kind: '{pipeline.kind}' runs only in a "
                                 f"'{needs}' sandbox (sandbox.provider is "
                                 f"'{self.sandbox.provider}')")
        for i, pipeline in enumerate(self.pipelines):
            if pipeline.timeout_s and pipeline.timeout_s > self.timeouts.pipeline_runs_s:
                raise ValueError(
                    f"pipelines[{i}].timeout_s: {pipeline.timeout_s:g} exceeds "
                    f"timeouts.pipeline_runs_s ({self.timeouts.pipeline_runs_s:g})"
                )
        for i, service in enumerate(self.sandbox.services):
            ready = getattr(service, "ready", None)  # a local service's probe
            if ready and ready.timeout_s and ready.timeout_s > self.timeouts.sandbox_s:
                raise ValueError(
                    f"sandbox.services[{i}].ready.timeout_s: {ready.timeout_s:g} exceeds "
                    f"timeouts.sandbox_s ({self.timeouts.sandbox_s:g})"
                )
        return self


def _unique(field: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{i}].name: duplicate name '{name}'")
        seen.add(name)
