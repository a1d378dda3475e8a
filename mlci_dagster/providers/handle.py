"""The serializable handle of a sandbox: what every later stage and the janitor need to reach it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit


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
