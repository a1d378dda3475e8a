"""The Cloud TPU VM provider: a TPU node per sandbox, created through the Cloud TPU v2 API and
waited to READY and to SSH; `ssh_command` pipelines run on it over SSH, and the test reports
they write there are fetched over SFTP; destroy deletes it, waits for the operation and verifies
the API says NOT_FOUND.

The node is the sandbox: labelled with the run, the partition and the expiry (`mlci-run-id`,
`mlci-partition`, `mlci-expires-at`), the whole handle in its metadata (`mlci-handle`), so the
janitor finds and reaps it from the API alone when the local ledger is lost. A node preempted
while a pipeline runs fails that pipeline as infra, never as a product regression.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.common.redact import Redactor, credential_names
from mlci_dagster.common.summary import summarize
from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.providers import host
from mlci_dagster.providers.base import (
    MAX_REPORT_BYTES,
    MAX_REPORT_FILES,
    PipelineResult,
    ReportError,
)
from mlci_dagster.providers.gcp_tpu import diagnose
from mlci_dagster.providers.gcp_tpu.client import NodeInfo, TpuApiError, TpuClient, parent_of
from mlci_dagster.providers.gcp_tpu.ssh import (
    FetchError,
    SshError,
    SshTarget,
    fetch_files,
    run_remote,
    wait_for_ssh,
)
from mlci_dagster.providers.handle import (
    DestroyReport,
    SandboxError,
    SandboxHandle,
    render_context,
)
from mlci_dagster.providers.logpipe import OutputWatcher
from mlci_dagster.providers.processes import GroupResult
from mlci_dagster.registry.gcp_tpu import SshCommandPipeline, TpuVmSandbox
from mlci_dagster.vocabulary import FailureKind

RUN_LABEL = "mlci-run-id"
PARTITION_LABEL = "mlci-partition"
EXPIRES_LABEL = "mlci-expires-at"
HANDLE_METADATA = "mlci-handle"
MAX_LABEL = 63
MAX_NODE_ID = 63
LIST_TIMEOUT_S = 10.0  # list_live asks the API with a short timeout: the janitor must move on
SUMMARY_CHARS = 2000


def node_id(config: str, engine: str, suffix: str) -> str:
    """`mlci-<config>-<engine>-<suffix>`, a node id of at most 63 characters starting with a
    letter: the config part is cut first, the engine part only beyond 20 characters."""
    engine = re.sub(r"[^a-z0-9-]", "-", engine.lower())[:20].strip("-")
    room = MAX_NODE_ID - len("mlci-") - len(suffix) - len(engine) - 2
    config = re.sub(r"[^a-z0-9-]", "-", config.lower())[:max(room, 0)].strip("-")
    return "-".join(part for part in ("mlci", config, engine, suffix) if part)


def label_value(text: str) -> str:
    """`text` as a GCP label value: at most 63 of [a-z0-9_-]; a longer text keeps its start and
    a hash of the whole, so values stay distinct."""
    value = re.sub(r"[^a-z0-9_-]", "-", text.lower())
    if len(value) > MAX_LABEL:
        value = f"{value[:MAX_LABEL - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return value


@dataclass(frozen=True)
class TpuLocation:
    """Where a provider instance looks for nodes: one project and zone on one API endpoint
    (as the registry writes them; `${env.NAME}` references are resolved when used)."""

    project: str
    zone: str
    api_endpoint: str | None = None


def _resolved(value: Any, what: str) -> Any:
    try:
        return render(value, {"env": dict(os.environ)})
    except TemplateError as exc:
        raise SandboxError(f"{what}: {exc}", FailureKind.CONFIG) from exc


class TpuVmProvider(host.ProviderHome):
    name = "gcp-tpu-vm"

    def __init__(self, home: str | Path, secret_names: list[str] | tuple[str, ...] = (),
                 root: Path | None = None, settings: TpuLocation | None = None,
                 poll_interval_s: float = 2.0) -> None:
        super().__init__(home, secret_names, root)
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self._clients: dict[str | None, TpuClient] = {}

    @staticmethod
    def settings_of(spec: TpuVmSandbox) -> TpuLocation:
        """One provider per project, zone and API endpoint the registry names."""
        return TpuLocation(spec.project, spec.zone, spec.api_endpoint)

    # --- reaching the API and the VM -------------------------------------------------------

    def _client(self, api_endpoint: str | None) -> TpuClient:
        if api_endpoint not in self._clients:
            self._clients[api_endpoint] = TpuClient(api_endpoint or None, self.poll_interval_s)
        return self._clients[api_endpoint]

    def _client_for(self, handle: SandboxHandle) -> TpuClient:
        return self._client(handle.state.get("api_endpoint"))

    def _redactor_for(self, handle: SandboxHandle) -> Redactor:
        """The registry's secrets and the SSH key, whole and line by line: logs are redacted
        a line at a time, and a key spans many."""
        key_env = handle.state["ssh"]["key_env"]
        names = [*self.secret_names, key_env, *credential_names(os.environ)]
        key_lines = [line.strip() for line in os.environ.get(key_env, "").splitlines()
                     if "PRIVATE KEY" not in line]
        return Redactor([*(os.environ.get(name, "") for name in names), *key_lines])

    def _ssh_target(self, handle: SandboxHandle) -> SshTarget:
        ssh = handle.state["ssh"]
        key = os.environ.get(ssh["key_env"], "")
        if not key.strip():
            raise SshError(f"environment variable {ssh['key_env']} (the SSH private key) is "
                           "not set")
        if not handle.state.get("ip"):
            raise SshError(f"node {handle.sandbox_id} has no known address (not READY yet)")
        return SshTarget(handle.state["ip"], int(ssh["port"]), ssh["user"], key,
                         float(ssh["connect_timeout_s"]))

    def _labels(self, handle: SandboxHandle) -> dict[str, str]:
        return {RUN_LABEL: label_value(handle.run_id),
                PARTITION_LABEL: label_value(f"{handle.config}_{handle.engine}"),
                EXPIRES_LABEL: str(int(handle.expires_at))}

    # --- lifecycle -----------------------------------------------------------------------

    def create(self, spec: TpuVmSandbox, *, config: str, engine: str, run_id: str,
               engine_variables: dict[str, str], teardown_s: float,
               image: dict[str, Any] | None = None) -> SandboxHandle:
        """Starts creating the node (labelled, its handle in its metadata); the handle is in the
        ledger first. On failure deletes what may exist and raises SandboxError (infra)."""
        suffix = uuid.uuid4().hex[:8]
        node = node_id(config, engine, suffix)
        project = _resolved(spec.project, "sandbox.project")
        zone = _resolved(spec.zone, "sandbox.zone")
        api_endpoint = _resolved(spec.api_endpoint, "sandbox.api_endpoint") or None
        user = _resolved(spec.ssh.user, "sandbox.ssh.user")
        port = _resolved(spec.ssh.port, "sandbox.ssh.port")
        if not str(port).isdigit():
            raise SandboxError(f"sandbox.ssh.port: expected a port number (got {port!r})",
                               "infra")
        handle = self.new_handle(
            node, config=config, engine=engine, run_id=run_id, ttl_s=spec.ttl_s,
            state={"project": project, "zone": zone, "api_endpoint": api_endpoint,
                   "node": f"{parent_of(project, zone)}/nodes/{node}",
                   "ssh": {"user": user, "port": int(port),
                           "key_env": spec.ssh.private_key_env,
                           "connect_timeout_s": spec.ssh.connect_timeout_s},
                   "external_ip": spec.external_ip, "state_poll_s": spec.state_poll_s,
                   "services": [s.model_dump() for s in spec.services]},
        )
        self.ledger.record(handle)  # before anything exists that could leak
        try:
            Path(handle.workdir).mkdir(parents=True)
            Path(handle.log_dir).mkdir(parents=True, exist_ok=True)
            context = render_context(handle, {}, image=image or {})
            handle.variables = render(engine_variables, context, keep=frozenset({"env"}))
            self.ledger.record(handle)
            body: dict[str, Any] = {
                "accelerator_type": spec.accelerator_type,
                "runtime_version": spec.runtime_version,
                "scheduling_config": {"spot": spec.spot},
                "labels": self._labels(handle),
                "metadata": {HANDLE_METADATA: json.dumps(handle.to_dict())},
                "description": f"mlci sandbox for {config}|{engine}",
            }
            if spec.external_ip:
                body["network_config"] = {"enable_external_ips": True}
            operation = self._client_for(handle).create_node(parent_of(project, zone), node,
                                                             body)
            handle.state["create_operation"] = operation
            self.ledger.record(handle)
        except (TpuApiError, TemplateError, OSError) as exc:
            raise host.create_failed(self, handle, node, exc, teardown_s,
                                     own=isinstance(exc, TemplateError)) from exc
        return handle

    def wait_until_ready(self, handle: SandboxHandle, spec: TpuVmSandbox, timeout_s: float,
                         image: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Waits for the create operation, then for the node to be READY, reads its address,
        then waits until SSH runs a command there. Raises SandboxError naming what is not."""
        start = time.monotonic()
        deadline = start + timeout_s
        client = self._client_for(handle)
        node = handle.state["node"]
        checks: list[dict[str, Any]] = []

        def failed(why: str, kind: FailureKind = FailureKind.INFRA) -> SandboxError:
            message = self.redactor.text(f"sandbox {handle.sandbox_id}: {why}")
            report = Path(handle.log_dir) / "tpu-not-ready.txt"
            with contextlib.suppress(OSError):
                report.write_text(message + "\n")
            return SandboxError(message, str(kind), log_ref=str(report))

        try:
            if operation := handle.state.get("create_operation"):
                client.wait_operation(operation, deadline, f"create_node {node}")
            checks.append({"object": "create operation", "ready": True,
                           "elapsed_s": round(time.monotonic() - start, 2)})
            while True:
                info = client.get_node(node)
                if info is None:
                    raise failed(f"node {node} does not exist (NOT_FOUND) after its create "
                                 "operation finished")
                verdict = diagnose.readiness(node, info.state, info.health_description)
                if verdict.ready:
                    break
                if verdict.terminal:
                    raise failed(verdict.why)
                if time.monotonic() >= deadline:
                    raise failed(f"{verdict.why} at the timeout of {timeout_s:g}s",
                                 FailureKind.TIMEOUT)
                time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
        except TimeoutError as exc:
            raise failed(f"{exc} (timeout {timeout_s:g}s)", FailureKind.TIMEOUT) from exc
        except TpuApiError as exc:
            raise failed(str(exc)) from exc
        ip = info.external_ip if handle.state.get("external_ip") else info.internal_ip
        if not ip:
            raise failed(f"node {node} is READY but has no "
                         f"{'external' if handle.state.get('external_ip') else 'internal'} IP "
                         "address in its networkEndpoints")
        handle.state["ip"] = ip
        handle.endpoints = {s["name"]: f"{s['scheme']}://{ip}:{s['port']}"
                            for s in handle.state.get("services", [])}
        self.ledger.record(handle)
        checks.append({"object": f"node {handle.sandbox_id}", "ready": True,
                       "why": f"READY at {ip}", "elapsed_s": round(time.monotonic() - start, 2)})
        try:
            target = self._ssh_target(handle)
            waited = wait_for_ssh(target, deadline, interval_s=min(2.0, self.poll_interval_s))
        except SshError as exc:
            kind = FailureKind.TIMEOUT if time.monotonic() >= deadline else FailureKind.INFRA
            raise failed(f"SSH to the node does not work: {exc}", kind) from exc
        checks.append({"object": "ssh", "ready": True,
                       "why": f"{target.user}@{ip}:{target.port} runs commands",
                       "elapsed_s": round(time.monotonic() - start, 2),
                       "waited_s": round(waited, 2)})
        return checks

    # --- reaching services ---------------------------------------------------------------

    def http(self, handle: SandboxHandle) -> requests.Session:
        """A plain session: the services' endpoints are the VM's own ports."""
        return requests.Session()

    # --- pipelines -----------------------------------------------------------------------

    def run_command(self, handle: SandboxHandle, name: str, argv: list[str],
                    env: dict[str, str], timeout_s: float,
                    watcher: OutputWatcher | None = None) -> GroupResult:
        """A `command` pipeline on this machine (providers/host.py); `ssh_command` runs on the
        VM."""
        return host.run_command(handle, name, argv, env, timeout_s,
                                secret_names=self.secret_names, redactor=self.redactor,
                                record=self.ledger.record, watcher=watcher)

    def run_pipeline(self, handle: SandboxHandle, pipeline: Any, context: dict[str, Any],
                     timeout_s: float) -> PipelineResult:
        """An `ssh_command` pipeline on the node: the command pipeline's contract (exit code,
        expected output, captured values, a timeout that kills the remote process group), and
        a node that stops being READY meanwhile (PREEMPTED) fails it as infra."""
        if not isinstance(pipeline, SshCommandPipeline):
            return PipelineResult(pipeline.name, pipeline.kind, False, 0.0, FailureKind.INFRA,
                                  f"a gcp-tpu-vm sandbox cannot run '{pipeline.kind}' pipelines")
        redactor = self._redactor_for(handle)
        command = render(pipeline.command, context)
        env = {**render(handle.variables, context), **render(pipeline.env, context)}
        watcher = OutputWatcher(render(pipeline.expect_output, context), pipeline.outputs)
        node = handle.state["node"]
        client = self._client_for(handle)

        lost_states: list[str] = []

        def node_lost() -> str:
            try:
                info = client.get_node(node, timeout_s=LIST_TIMEOUT_S)
            except TpuApiError:
                return ""  # the API's hiccup is not the node's loss; SSH goes on
            why = diagnose.interruption(node, info.state if info else None)
            if why and info is not None:
                lost_states.append(info.state)
            return why

        def result(passed: bool, kind: FailureKind | None, why: str, duration_s: float,
                   log_ref: str = "", tail: str = "", **details: Any) -> PipelineResult:
            summary = summarize(redactor.text(f"{why}\n{tail}".strip()), SUMMARY_CHARS)
            return PipelineResult(pipeline.name, pipeline.kind, passed, duration_s, kind,
                                  "" if passed else summary, log_ref, details=details,
                                  # what retries_on_preemption retries
                                  preempted="PREEMPTED" in lost_states)

        if lost := node_lost():
            return result(False, FailureKind.INFRA, lost, 0.0)
        log_path = Path(handle.log_dir) / f"pipeline-{pipeline.name}.log"
        Path(handle.log_dir).mkdir(parents=True, exist_ok=True)
        try:
            done = run_remote(
                self._ssh_target(handle), command, env,
                pgid_file=f"/tmp/mlci-{handle.sandbox_id}-{pipeline.name}.pgid",
                timeout_s=timeout_s, log_path=log_path, redactor=redactor, watcher=watcher,
                check=node_lost, check_every_s=float(handle.state.get("state_poll_s", 15)))
        except (SshError, OSError) as exc:
            why = node_lost() or f"could not run the command over SSH: {exc}"
            return result(False, FailureKind.INFRA, why, 0.0, str(log_path))
        tail = done.stderr_tail or done.stdout_tail
        details = {"exit_code": done.exit_code, "remote_kill": done.killed}
        if done.interrupted:
            why = done.interrupted if done.interrupted.startswith("node ") else (
                node_lost() or f"{done.interrupted} while the command ran")
            return result(False, FailureKind.INFRA, why, done.duration_s, done.log_path, tail,
                          **details)
        if done.timed_out:
            return result(False, FailureKind.TIMEOUT,
                          f"killed at its timeout of {timeout_s:g}s ({done.killed})",
                          done.duration_s, done.log_path, tail, **details)
        if done.exit_code != pipeline.expect_exit_code:
            # A VM going away takes its commands with it: infra, even if one saw an exit code.
            if lost := node_lost():
                return result(False, FailureKind.INFRA, lost, done.duration_s, done.log_path,
                              tail, **details)
            return result(False, FailureKind.PRODUCT,
                          f"exited {done.exit_code}, expected {pipeline.expect_exit_code}",
                          done.duration_s, done.log_path, tail, **details)
        if watcher.missing:
            return result(False, FailureKind.PRODUCT, f"output lacks {watcher.missing[0]!r}",
                          done.duration_s, done.log_path, tail, **details)
        for key, pattern in pipeline.outputs.items():
            if key not in watcher.captured:
                return result(False, FailureKind.PRODUCT,
                              f"output '{key}' not found: /{pattern}/", done.duration_s,
                              done.log_path, tail, **details)
        passed = result(True, None, "", done.duration_s, done.log_path, **details)
        passed.outputs = {key: watcher.captured[key] for key in pipeline.outputs}
        return passed

    def report_files(self, handle: SandboxHandle, pipeline: Any, pattern: str, into: Path
                     ) -> list[Path]:
        """The test reports an `ssh_command` pipeline wrote on the VM, copied over SFTP on the
        pipelines' own SSH login (ssh.fetch_files: wildcards per path component, sizes checked
        by stat first): `pattern` absolute, or relative to the login's home directory, where the
        command ran. A node no longer READY took its files with it: said at once, without
        waiting on SSH. ReportError names the node, the login and the file."""
        if not isinstance(pipeline, SshCommandPipeline):
            return super().report_files(handle, pipeline, pattern, into)
        node = handle.state.get("node", handle.sandbox_id)
        with contextlib.suppress(TpuApiError):  # the API's hiccup is not the node's loss
            info = self._client_for(handle).get_node(node, timeout_s=LIST_TIMEOUT_S)
            if info is None or info.state in diagnose.LOST:
                why = (diagnose.readiness(node, info.state).why if info else
                       f"node {node} no longer exists")
                raise ReportError(f"{why}; the reports on it went with it")
        try:
            return fetch_files(self._ssh_target(handle), pattern, into,
                               max_files=MAX_REPORT_FILES, max_bytes=MAX_REPORT_BYTES)
        except (SshError, FetchError) as exc:
            raise ReportError(self._redactor_for(handle).text(
                f"node {handle.sandbox_id}: {exc}")) from exc

    # --- artifacts and teardown ----------------------------------------------------------

    def collect_artifacts(self, handle: SandboxHandle) -> list[str]:
        """The node as the API describes it (`tpu-node.json`, without its metadata) beside the
        pipelines' logs. Never raises: what cannot be collected is said in the file."""
        log_dir = Path(handle.log_dir)
        with contextlib.suppress(OSError):
            log_dir.mkdir(parents=True, exist_ok=True)
            try:
                info = self._client_for(handle).get_node(handle.state["node"])
                described: dict[str, Any] = (info.to_dict() if info else
                                             {"name": handle.state["node"], "found": False})
            except (TpuApiError, KeyError) as exc:
                described = {"name": handle.state.get("node"), "error": str(exc)}
            (log_dir / "tpu-node.json").write_text(
                self.redactor.text(json.dumps(described, indent=1)))
        try:
            return sorted(str(p) for p in log_dir.iterdir()
                          if p.is_file() and p.suffix in (".log", ".json", ".txt"))
        except OSError:
            return []

    def destroy(self, handle: SandboxHandle, *, timeout_s: float) -> DestroyReport:
        """Kills local pipeline processes, deletes the node, waits for the delete operation and
        verifies the API says NOT_FOUND. Idempotent: a node already gone is clean. The ledger
        entry stays while anything is left."""
        deadline = time.monotonic() + timeout_s
        stopped = host.stop_processes(handle, timeout_s)
        problems: list[str] = []
        node = handle.state.get("node", handle.sandbox_id)
        report: dict[str, Any] = {"node": node, "node_gone": False}
        try:
            report["node_gone"] = self._delete_node(handle, node, deadline, problems)
        except TpuApiError as exc:
            problems.append(f"node {node} could not be deleted: {exc}")
        return host.finish_destroy(handle, stopped, problems, self.ledger, self.redactor,
                                   **report)

    def _delete_node(self, handle: SandboxHandle, node: str, deadline: float,
                     problems: list[str]) -> bool:
        """Deletes the node and waits until the API says NOT_FOUND; whether it did."""
        client = self._client_for(handle)
        try:
            operation = client.delete_node(node)
        except TpuApiError:
            # A node still being created may refuse deletion: let its creation end, then retry.
            creating = handle.state.get("create_operation")
            if not creating:
                raise
            with contextlib.suppress(TpuApiError, TimeoutError):
                client.wait_operation(creating, deadline, f"create_node {node}")
            operation = client.delete_node(node)
        if operation is not None:
            try:
                client.wait_operation(operation, deadline, f"delete_node {node}")
            except (TpuApiError, TimeoutError) as exc:
                problems.append(str(exc))
        info = client.get_node(node)
        while info is not None and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
            info = client.get_node(node)
        if info is not None:
            problems.append(f"node {node} still exists ({info.state}) after its deletion")
        return info is None

    def list_live(self) -> list[SandboxHandle]:
        """The ledger's TPU sandboxes, and every node in this provider's project and zone that
        carries the mlci labels (rebuilt from its metadata, else its labels), each once. An API
        that cannot be reached leaves the ledger's entries alone."""
        found = {h.sandbox_id: h for h in self.ledger.live(self.name)}
        if self.settings is None:
            return list(found.values())
        try:
            project = _resolved(self.settings.project, "project")
            zone = _resolved(self.settings.zone, "zone")
            endpoint = _resolved(self.settings.api_endpoint, "api_endpoint") or None
            nodes = self._client(endpoint).list_nodes(parent_of(project, zone),
                                                      timeout_s=LIST_TIMEOUT_S)
        except (SandboxError, TpuApiError):
            return list(found.values())
        for info in nodes:
            if RUN_LABEL in info.labels:
                handle = self.handle_from_node(info, endpoint)
                found.setdefault(handle.sandbox_id, handle)
        return list(found.values())

    def handle_from_node(self, info: NodeInfo, api_endpoint: str | None) -> SandboxHandle:
        """The handle a node carries in its metadata; from its labels if that is lost. Either
        way it is reached through `api_endpoint`, the way it was found."""
        node = info.name.rsplit("/", 1)[-1]
        try:
            handle = SandboxHandle.from_dict(json.loads(info.metadata[HANDLE_METADATA]))
        except (KeyError, TypeError, ValueError):
            config, _, engine = info.labels.get(PARTITION_LABEL, "").partition("_")
            try:
                expires_at = float(info.labels.get(EXPIRES_LABEL, "0"))
            except ValueError:
                expires_at = 0.0  # unknown: expired, so the janitor reaps it
            handle = SandboxHandle(
                sandbox_id=node, provider=self.name, config=config, engine=engine,
                run_id=info.labels.get(RUN_LABEL, ""), created_at=0.0, expires_at=expires_at,
                workdir=str(self.home / "sandboxes" / node),
                log_dir=str(self.home / "logs" / node), state={})
        project, _, rest = info.name.removeprefix("projects/").partition("/locations/")
        handle.state.update({"node": info.name, "project": project,
                             "zone": rest.partition("/")[0], "api_endpoint": api_endpoint})
        handle.state.setdefault("ssh", {"key_env": "", "user": "", "port": 22,
                                        "connect_timeout_s": 30})
        return handle

