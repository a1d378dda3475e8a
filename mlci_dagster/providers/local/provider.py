"""The embedded default provider: services as local child processes, one sandbox per partition.

Each sandbox has its own work directory, a free port per service and a ledger entry; every
process runs in its own process group, so destroy can kill all of it and prove it did. A
service's port stays reserved against every other allocation on the machine until the sandbox is
ready (its services listening) or destroyed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.providers import host
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import (
    DestroyReport,
    SandboxError,
    SandboxHandle,
    render_context,
)
from mlci_dagster.providers.host import sandbox_env
from mlci_dagster.providers.logpipe import OutputWatcher, log_tail
from mlci_dagster.providers.ports import PortReservation, port_is_free, reserve_free_port
from mlci_dagster.providers.probes import wait_until_ready
from mlci_dagster.providers.processes import (
    GroupResult,
    group_members,
    start_group,
)
from mlci_dagster.registry.models import LocalSandbox, ServiceSpec
from mlci_dagster.vocabulary import FailureKind


class LocalProvider(host.ProviderHome):
    name = "local"

    def __init__(self, home: str | Path, secret_names: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(home, secret_names)
        # Per sandbox, its ports' reservations until its services listen on them.
        self._port_holds: dict[str, list[PortReservation]] = {}

    @classmethod
    def from_settings(cls, home: Path, secret_names: list[str], root: Path | None = None,
                      settings: Any = None) -> LocalProvider:
        return cls(home, secret_names)

    @staticmethod
    def settings_of(spec: LocalSandbox) -> None:
        """One local provider serves every local sandbox."""
        return None

    # --- lifecycle ---------------------------------------------------------------------------

    def create(
        self,
        spec: LocalSandbox,
        *,
        config: str,
        engine: str,
        run_id: str,
        engine_variables: dict[str, str],
        teardown_s: float,
        image: dict[str, Any] | None = None,
    ) -> SandboxHandle:
        """Reserves ports, makes the directories and starts every service; cleans up on failure."""
        handle = self.new_handle(f"{config}.{engine}.{uuid.uuid4().hex[:8]}", config=config,
                                 engine=engine, run_id=run_id, ttl_s=spec.ttl_s)
        holds = self._port_holds.setdefault(handle.sandbox_id, [])
        try:
            with self.ledger.lock():
                reserved = self.ledger.reserved_ports()
                for service in spec.services:
                    holds.append(reserve_free_port(reserved | set(handle.ports.values())))
                    port = holds[-1].port
                    handle.ports[service.name] = port
                    handle.endpoints[service.name] = f"http://127.0.0.1:{port}"
                self.ledger.record(handle)
        except BaseException:
            self.release_ports(handle)
            raise
        try:
            Path(handle.workdir).mkdir(parents=True)
            Path(handle.log_dir).mkdir(parents=True, exist_ok=True)
            context = render_context(handle, {}, image=image or {})
            handle.variables = render(engine_variables, context, keep=frozenset({"env"}))
            for service in spec.services:
                self._start_service(handle, service, image or {})
        except (OSError, TemplateError) as exc:
            self.destroy(handle, timeout_s=teardown_s)
            raise SandboxError(f"sandbox could not start: {exc}",
                               FailureKind.CONFIG if isinstance(exc, TemplateError)
                               else FailureKind.INFRA) from exc
        return handle

    def _start_service(
        self, handle: SandboxHandle, service: ServiceSpec, image: dict[str, Any]
    ) -> None:
        context = render_context(
            handle, dict(os.environ), port=handle.ports[service.name], image=image
        )
        argv = render(service.command, context)
        env = self.process_env(handle, render(service.env, context))
        log_path = Path(handle.log_dir) / f"service-{service.name}.log"
        wrapped = [sys.executable, "-m", "mlci_dagster.providers.logpipe", str(log_path), "--"]
        handle.process_groups[f"service:{service.name}"] = start_group(
            [*wrapped, *argv], cwd=Path(handle.workdir), env=env, log_path=log_path
        )
        self.ledger.record(handle)

    def process_env(self, handle: SandboxHandle, extra: dict[str, str]) -> dict[str, str]:
        return sandbox_env(handle, self.secret_names, extra)

    def wait_until_ready(
        self, handle: SandboxHandle, spec: LocalSandbox, timeout_s: float,
        image: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Probes every service in turn; raises SandboxError (with the log tail) if one fails.
        The sandbox's ports are released to other allocations either way: its services listen
        on them now, or it is about to be destroyed."""
        try:
            return self._wait_until_ready(handle, spec, timeout_s, image)
        finally:
            self.release_ports(handle)

    def release_ports(self, handle: SandboxHandle) -> None:
        for reservation in self._port_holds.pop(handle.sandbox_id, []):
            reservation.release()

    def _wait_until_ready(
        self, handle: SandboxHandle, spec: LocalSandbox, timeout_s: float,
        image: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        results = []
        for service in spec.services:
            probe = service.ready
            log_path = Path(handle.log_dir) / f"service-{service.name}.log"
            if probe.command:
                context = render_context(handle, dict(os.environ),
                                         port=handle.ports[service.name], image=image or {})
                try:
                    probe = probe.model_copy(update={"command": render(probe.command, context)})
                except TemplateError as exc:
                    raise SandboxError(f"service '{service.name}': ready.command: {exc}",
                                       FailureKind.CONFIG, log_ref=str(log_path)) from exc
            pgid = handle.process_groups[f"service:{service.name}"]

            def exited(pgid: int = pgid) -> str | None:
                return None if group_members(pgid) else "exited before ready"

            result = wait_until_ready(
                service.name, probe, handle.ports[service.name],
                env=self.process_env(handle, {}), cwd=handle.workdir, deadline=deadline,
                exited=exited,
            )
            results.append(result.to_dict())
            if not result.ready:
                why = "not ready in time" if result.timed_out else "failed"
                raise SandboxError(
                    f"service '{service.name}' {why} after {result.attempts} probes "
                    f"({result.elapsed_s:.1f}s): {result.last_error}\n"
                    f"log tail:\n{log_tail(log_path)}",
                    "timeout" if result.timed_out else "product",
                    log_ref=str(log_path),
                )
        return results

    def http(self, handle: SandboxHandle) -> requests.Session:
        return requests.Session()  # the services listen on loopback, open to this process

    def run_command(
        self, handle: SandboxHandle, name: str, argv: list[str], env: dict[str, str],
        timeout_s: float, watcher: OutputWatcher | None = None,
    ) -> GroupResult:
        """A `command` pipeline: see providers/host.py."""
        return host.run_command(handle, name, argv, env, timeout_s,
                                secret_names=self.secret_names, redactor=self.redactor,
                                record=self.ledger.record, watcher=watcher)

    def run_pipeline(self, handle: SandboxHandle, pipeline: Any, context: dict[str, Any],
                     timeout_s: float) -> PipelineResult:
        # The registry only admits kinds a local sandbox runs; this is the harness's safety net.
        return PipelineResult(pipeline.name, pipeline.kind, False, 0.0, FailureKind.INFRA,
                              f"a local sandbox cannot run '{pipeline.kind}' pipelines")

    def collect_artifacts(self, handle: SandboxHandle) -> list[str]:
        return sorted(str(p) for p in Path(handle.log_dir).glob("*.log"))

    def destroy(self, handle: SandboxHandle, *, timeout_s: float) -> DestroyReport:
        """Kills every process group, frees the ports, removes the work directory. Idempotent.

        Each group gets SIGTERM and a grace of a tenth of `timeout_s` (at most 5 s) before
        SIGKILL. Returns what it verified; the ledger entry stays while anything is left, for
        the janitor.
        """
        # Some platforms (Ray's workers, PostgreSQL's backends) leave their process group; every
        # sandbox process carries the sandbox id in its environment, so none can hide.
        stopped = host.stop_processes(handle, timeout_s)
        self.release_ports(handle)
        leaked = stopped.leaked
        deadline = time.monotonic() + 5
        busy = [p for p in handle.ports.values() if not port_is_free(p)]
        while busy and time.monotonic() < deadline:
            time.sleep(0.1)
            busy = [p for p in busy if not port_is_free(p)]
        shutil.rmtree(handle.workdir, ignore_errors=True)
        workdir_left = Path(handle.workdir).exists()
        clean = not leaked and not busy and not workdir_left
        if clean:
            self.ledger.remove(handle.sandbox_id)
        return DestroyReport(clean, process_groups=sorted(handle.process_groups),
                             escaped_group=stopped.escaped, leaked_pids=leaked,
                             busy_ports=busy, workdir_left=workdir_left)

    def list_live(self) -> list[SandboxHandle]:
        return self.ledger.live(self.name)
