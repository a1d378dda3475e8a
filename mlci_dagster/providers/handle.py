"""The serializable handle of a sandbox (what every later stage and the janitor need to reach
it), and what destroying it verified."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mlci_dagster.providers.processes import pids_text


@dataclass
class SandboxHandle:
    sandbox_id: str
    provider: str
    config: str
    engine: str
    run_id: str
    created_at: float
    expires_at: float
    workdir: str
    log_dir: str
    ports: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    # name -> process group id of every process the sandbox started (services, running pipelines)
    process_groups: dict[str, int] = field(default_factory=dict)
    # The process that created it, as (pid, start time in clock ticks): if that process is gone
    # while the run is not over, the run crashed and the janitor may reap the sandbox.
    owner_pid: int = 0
    owner_start: int = 0
    # What else the provider needs to reach the sandbox again (a cluster and namespace).
    state: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxHandle:
        return cls(**data)


@dataclass
class DestroyReport:
    """What `Provider.destroy` verified: `clean` only when nothing of the sandbox is left, and
    `why` (the provider's own words: a namespace stuck on its finalizers, a cloud delete
    pending) when it is not. The host facts every provider checks, then what it checked in its
    own API (`remote`: a namespace, a TPU node, SageMaker's resources)."""

    clean: bool
    why: str = ""
    process_groups: list[str] = field(default_factory=list)
    escaped_group: list[int] = field(default_factory=list)  # killed outside their group
    leaked_pids: dict[str, list[int]] = field(default_factory=dict)
    busy_ports: list[int] = field(default_factory=list)
    workdir_left: bool = False
    remote: dict[str, Any] = field(default_factory=dict)

    def left_behind(self) -> str:
        """What the destroy left, in words; empty when it left nothing. Every place that
        reports an unclean destroy says it with this."""
        if self.clean:
            return ""
        if self.why:
            return self.why
        left = []
        if self.leaked_pids:
            left.append(f"processes left: {pids_text(self.leaked_pids)}")
        if self.busy_ports:
            left.append("ports still in use: " + ", ".join(str(p) for p in self.busy_ports))
        if self.workdir_left:
            left.append("work directory left")
        return "; ".join(left) or "the provider could not verify that nothing is left"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SandboxError(Exception):
    """A sandbox could not be created or made ready; carries the failure kind and log tail."""

    def __init__(self, message: str, kind: str, log_ref: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.log_ref = log_ref


def render_context(handle: SandboxHandle, environ: dict[str, str], **extra: Any) -> dict[str, Any]:
    """What `${...}` references can reach once a sandbox exists (see common/templating.py)."""
    return {
        "config": handle.config,
        "engine": handle.engine,
        "sandbox": {"id": handle.sandbox_id, "workdir": handle.workdir},
        "services": {
            name: {"port": handle.ports.get(name) or urlsplit(url).port,
                   "host": urlsplit(url).hostname, "url": url}
            for name, url in handle.endpoints.items()
        },
        "vars": handle.variables,
        "env": environ,
        **extra,
    }
