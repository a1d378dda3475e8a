"""The on-disk ledger of live sandboxes: a JSON file each, so any process can find and reap them."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlci_dagster.providers.handle import SandboxHandle


class Ledger:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialises port reservation across processes sharing this ledger."""
        with open(self.directory / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def record(self, handle: SandboxHandle) -> None:
        tmp = self._path(handle.sandbox_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(handle.to_dict(), indent=1))
        os.replace(tmp, self._path(handle.sandbox_id))

    def remove(self, sandbox_id: str) -> None:
        self._path(sandbox_id).unlink(missing_ok=True)

    def live(self, provider: str | None = None) -> list[SandboxHandle]:
        """Every handle recorded (by `provider`, if given)."""
        handles = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                handles.append(SandboxHandle.from_dict(json.loads(path.read_text())))
            except (OSError, ValueError):
                continue  # removed or being replaced while we read
        return [h for h in handles if provider in (None, h.provider)]

    def reserved_ports(self) -> set[int]:
        return {port for handle in self.live() for port in handle.ports.values()}
