"""The aws-sagemaker provider: a SageMaker real-time endpoint per sandbox (a model, an endpoint
config and the endpoint, all three under the sandbox's name), waited to InService; pipelines
invoke it; `command` pipelines run on this machine with its name in their environment.

Every resource carries the tags `mlci:run-id`, `mlci:partition` and `mlci:expires-at`, so the
janitor finds them in the region when the local ledger is lost, including a model or config
whose endpoint never came (a create that timed out on this side but went through). Destroy
deletes endpoint, config and model, each by name whatever the handle says was made, and
verifies SageMaker no longer knows any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.common.aws import AwsAccess, AwsSettings
from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.providers import host
from mlci_dagster.providers.aws import diagnose
from mlci_dagster.providers.aws.client import KINDS, SageMakerClient, SageMakerError, tags_of
from mlci_dagster.providers.aws.pipelines import invoke
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import (
    DestroyReport,
    SandboxError,
    SandboxHandle,
    render_context,
)
from mlci_dagster.providers.logpipe import OutputWatcher
from mlci_dagster.providers.processes import (
    GroupResult,
)
from mlci_dagster.registry.aws import EndpointService, SageMakerInvokePipeline, SageMakerSandbox
from mlci_dagster.vocabulary import FailureKind

ENDPOINT_VARIABLE = "MLCI_SAGEMAKER_ENDPOINT"  # what a `command` pipeline invokes
REGION_VARIABLE = "MLCI_SAGEMAKER_REGION"
DELETE_ORDER = ("endpoint", "endpoint-config", "model")


def invocations_url(access: AwsAccess, endpoint: str) -> str:
    base = access.endpoint_url or f"https://runtime.sagemaker.{access.region}.amazonaws.com"
    return f"{base.rstrip('/')}/endpoints/{endpoint}/invocations"


def default_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class SageMakerProvider(host.ProviderHome):
    name = "aws-sagemaker"

    def __init__(self, home: str | Path, secret_names: list[str] | tuple[str, ...] = (),
                 root: Path | None = None, settings: AwsSettings | None = None,
                 poll_interval_s: float = 10.0) -> None:
        super().__init__(home, secret_names, root)
        self.settings = settings or AwsSettings(default_region())
        self.poll_interval_s = poll_interval_s
        self._clients: dict[AwsAccess, SageMakerClient] = {}

    @staticmethod
    def settings_of(spec: SageMakerSandbox) -> AwsSettings:
        """One provider per region and API endpoint the registry names."""
        return AwsSettings(spec.region, spec.endpoint_url)

    # --- reaching the API ----------------------------------------------------------------

    def client(self, access: AwsAccess) -> SageMakerClient:
        if access not in self._clients:
            self._clients[access] = SageMakerClient(access)
        return self._clients[access]

    def _access_of(self, handle: SandboxHandle) -> AwsAccess:
        if "access" not in handle.state:
            raise SageMakerError(f"sandbox {handle.sandbox_id}: its handle does not say which "
                                 "region holds it")
        return AwsAccess.from_dict(handle.state["access"])

    # --- lifecycle -----------------------------------------------------------------------

    def create(self, spec: SageMakerSandbox, *, config: str, engine: str, run_id: str,
               engine_variables: dict[str, str], teardown_s: float,
               image: dict[str, Any] | None = None) -> SandboxHandle:
        """Creates the model, the endpoint config and the endpoint, tagged, in that order; the
        handle is in the ledger first. On any failure deletes all three and raises
        SandboxError (infra) naming the call and why."""
        name = diagnose.resource_name(config, engine, uuid.uuid4().hex[:8])
        try:
            access = self.settings_of(spec).resolve()
        except TemplateError as exc:  # nothing exists yet: nothing to clean
            raise SandboxError(f"sandbox {name} could not be created: {exc}",
                               FailureKind.CONFIG) from exc
        service = next((s for s in spec.services if isinstance(s, EndpointService)),
                       EndpointService())
        handle = self.new_handle(
            name, config=config, engine=engine, run_id=run_id, ttl_s=spec.ttl_s,
            endpoints={service.name: invocations_url(access, name)},
            state={"access": access.to_dict(), "endpoint_name": name, "created": []},
        )
        self.ledger.record(handle)  # before anything exists that could leak
        try:
            Path(handle.workdir).mkdir(parents=True)
            Path(handle.log_dir).mkdir(parents=True, exist_ok=True)
            context = render_context(handle, {}, image=image or {})
            handle.variables = {**render(engine_variables, context, keep=frozenset({"env"})),
                                ENDPOINT_VARIABLE: name, REGION_VARIABLE: access.region}
            self.ledger.record(handle)
            context = render_context(handle, dict(os.environ), image=image or {})
            container_image = render(spec.image, context)
            environment = render(spec.environment, context)
            client = self.client(access)
            tags = tags_of(diagnose.tag_value(run_id),
                           diagnose.tag_value(f"{config}.{engine}"), handle.expires_at, name)
            arns = handle.state.setdefault("arns", {})
            arns["model"] = client.create_model(name, container_image, spec.execution_role_arn,
                                                environment, spec.model_data_url, tags)
            self._created(handle, "model")
            arns["endpoint-config"] = client.create_endpoint_config(
                name, name, spec.instance_type, spec.instance_count, tags)
            self._created(handle, "endpoint-config")
            arns["endpoint"] = client.create_endpoint(name, name, tags)
            handle.state["endpoint_arn"] = arns["endpoint"]
            self._created(handle, "endpoint")
        except (SageMakerError, TemplateError, OSError) as exc:
            raise host.create_failed(self, handle, name, exc, teardown_s,
                                     own=isinstance(exc, TemplateError)) from exc
        return handle

    def _created(self, handle: SandboxHandle, kind: str) -> None:
        handle.state["created"].append(kind)
        self.ledger.record(handle)

    def wait_until_ready(self, handle: SandboxHandle, spec: SageMakerSandbox, timeout_s: float,
                         image: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Describes the endpoint until InService. Failed (with SageMaker's FailureReason),
        OutOfService or gone raises at once; so does the timeout, naming the last status."""
        timeout_s = min(spec.wait_timeout_s or timeout_s, timeout_s)
        start = time.monotonic()
        name = handle.state.get("endpoint_name", handle.sandbox_id)
        try:
            found = self.client(self._access_of(handle)).wait_endpoint(
                name, start + timeout_s, self.poll_interval_s,
                lambda d: (s := diagnose.endpoint_state(d)).ready or s.failed)
        except SageMakerError as exc:
            raise SandboxError(self.redactor.text(f"endpoint {name}: {exc}"), "infra") from exc
        state = diagnose.endpoint_state(found)
        elapsed = time.monotonic() - start
        if state.ready:
            return [{"name": "endpoint", "endpoint": name, "ready": True, "status": "InService",
                     "elapsed_s": round(elapsed, 3),
                     "instance_type": spec.instance_type,
                     "instance_count": spec.instance_count}]
        kind = diagnose.failure_kind(state)
        why = (f"endpoint {name} failed after {elapsed:.0f}s: {state.why}" if state.failed
               else f"endpoint {name} not InService within {timeout_s:g}s: {state.why}")
        report = Path(handle.log_dir) / "sagemaker-not-ready.txt"
        try:
            report.write_text(self.redactor.text(
                why + "\n" + json.dumps(_public(found), indent=1, default=str) + "\n"))
        except OSError:
            report = Path(handle.log_dir)
        raise SandboxError(self.redactor.text(why), str(kind), log_ref=str(report))

    # --- reaching the endpoint and pipelines ---------------------------------------------

    def http(self, handle: SandboxHandle) -> requests.Session:
        """A plain session: the endpoint's URL needs SigV4, which `sagemaker_invoke` does."""
        return requests.Session()

    def run_command(self, handle: SandboxHandle, name: str, argv: list[str],
                    env: dict[str, str], timeout_s: float,
                    watcher: OutputWatcher | None = None) -> GroupResult:
        """A `command` pipeline on this machine (providers/host.py), with the endpoint's name
        and region in MLCI_SAGEMAKER_ENDPOINT and MLCI_SAGEMAKER_REGION."""
        return host.run_command(handle, name, argv, env, timeout_s,
                                secret_names=self.secret_names, redactor=self.redactor,
                                record=self.ledger.record, watcher=watcher)

    def run_pipeline(self, handle: SandboxHandle, pipeline: Any, context: dict[str, Any],
                     timeout_s: float) -> PipelineResult:
        """A `sagemaker_invoke` pipeline."""
        if not isinstance(pipeline, SageMakerInvokePipeline):
            return PipelineResult(pipeline.name, pipeline.kind, False, 0.0, FailureKind.INFRA,
                                  f"an aws-sagemaker sandbox cannot run '{pipeline.kind}' "
                                  "pipelines")
        access = AwsAccess.from_dict(handle.state["access"])
        return invoke(handle, pipeline, context, timeout_s,
                      connect=lambda t: SageMakerClient(access, invoke_timeout_s=t),
                      root=self.root, redactor=self.redactor)

    # --- artifacts and teardown ----------------------------------------------------------

    def collect_artifacts(self, handle: SandboxHandle) -> list[str]:
        """`sagemaker-resources.json`: what SageMaker says of the endpoint, config and model
        (the container's environment left out), beside the pipeline logs. Never raises."""
        log_dir = Path(handle.log_dir)
        with contextlib.suppress(OSError):
            log_dir.mkdir(parents=True, exist_ok=True)
            described: dict[str, Any] = {}
            try:
                client = self.client(self._access_of(handle))
                for kind in DELETE_ORDER:
                    try:
                        described[kind] = _public(client.describe(kind, handle.sandbox_id))
                    except SageMakerError as exc:
                        described[kind] = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the debug bundle must not stop a teardown
                described["error"] = f"{type(exc).__name__}: {exc}"
            (log_dir / "sagemaker-resources.json").write_text(self.redactor.text(
                json.dumps(described, indent=1, default=str)))
        try:
            return sorted(str(p) for p in log_dir.iterdir()
                          if p.is_file() and p.suffix in (".log", ".json", ".txt"))
        except OSError:
            return []

    def destroy(self, handle: SandboxHandle, *, timeout_s: float) -> DestroyReport:
        """Kills local pipeline processes; deletes the endpoint and waits until SageMaker no
        longer knows it, then the endpoint config and the model; verifies each `describe`
        says not found. Idempotent. The ledger entry stays while anything is left."""
        deadline = time.monotonic() + timeout_s
        stopped = host.stop_processes(handle, timeout_s)
        problems: list[str] = []
        resources: dict[str, str] = {}
        try:
            client = self.client(self._access_of(handle))
            for kind in DELETE_ORDER:
                resources[kind] = self._delete(client, kind, handle.sandbox_id, deadline)
        except SageMakerError as exc:
            problems.append(str(exc))
        problems += [f"{kind} {handle.sandbox_id} left: {why}"
                     for kind, why in resources.items() if why != "gone"]
        return host.finish_destroy(handle, stopped, problems, self.ledger, self.redactor,
                                   resources=resources)

    def _delete(self, client: SageMakerClient, kind: str, name: str, deadline: float) -> str:
        """Deletes one resource and waits until `describe` says not found: "gone", or what is
        left. A refusal while it is busy (an endpoint still Creating) is tried again."""
        while True:
            try:
                client.delete(kind, name)
                break
            except SageMakerError as exc:
                if exc.code != "ValidationException" or time.monotonic() >= deadline:
                    return f"not deleted: {exc}"
            time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
        while True:
            try:
                found = client.describe(kind, name)
            except SageMakerError as exc:
                return f"not verified gone: {exc}"
            if found is None:
                return "gone"
            if time.monotonic() >= deadline:
                status = found.get("EndpointStatus", "still described")
                return f"still there at the deadline ({status})"
            time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))

    def list_live(self) -> list[SandboxHandle]:
        """The ledger's sagemaker sandboxes, and every model, endpoint config or endpoint in
        this provider's region tagged `mlci:run-id` (a sandbox per shared name, rebuilt from
        the tags), each once. An API that cannot be reached leaves the ledger's entries."""
        found = {h.sandbox_id: h for h in self.ledger.live(self.name)}
        try:
            access = self.settings.resolve()
            tagged = list(self.client(access).tagged(diagnose.NAME_PREFIX, diagnose.RUN_TAG))
        except (SageMakerError, TemplateError):
            return list(found.values())
        for name, entry in diagnose.group_tagged(tagged).items():
            if name in found:
                continue
            config, _, engine = entry["partition"].partition(".")
            found[name] = SandboxHandle(
                sandbox_id=name, provider=self.name, config=config, engine=engine,
                run_id=entry["run_id"], created_at=0.0, expires_at=entry["expires_at"] or 0.0,
                workdir=str(self.home / "sandboxes" / name),
                log_dir=str(self.home / "logs" / name),
                state={"access": access.to_dict(), "endpoint_name": name,
                       "arns": entry["kinds"], "created": sorted(entry["kinds"],
                                                                 key=KINDS.index)})
        return list(found.values())


def _public(description: dict[str, Any] | None) -> dict[str, Any] | None:
    """A description without the container's environment (it may hold rendered secrets)."""
    if description is None:
        return None
    public = {k: v for k, v in description.items() if k != "ResponseMetadata"}
    for key in ("PrimaryContainer",):
        if isinstance(public.get(key), dict):
            public[key] = {k: v for k, v in public[key].items() if k != "Environment"}
    if isinstance(public.get("Containers"), list):
        public["Containers"] = [{k: v for k, v in c.items() if k != "Environment"}
                                for c in public["Containers"]]
    return public
