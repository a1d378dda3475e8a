"""A run's links, as every view shows them (the report, the grid, the notifications, the
published site): its Dagster run at the UI's base URL, and the failing stage's log and the debug
bundle where the artifact store serves them. Only what the store took whole is linked: a piece
still pending has no link, and the view shows the path on the machine that ran it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mlci_dagster.history.record import ArtifactRecord

# An artifact's key -> the URL a reader opens (the store's public URL, a presigned URL, or a
# file:// URL); "" when none can be made.
Link = Callable[[str], str]


def run_link(ui_url: str, run_id: str) -> str:
    """The run's page in the Dagster UI; "" without a UI URL or a run."""
    return f"{ui_url.rstrip('/')}/runs/{run_id}" if ui_url and run_id else ""


def evidence_keys(artifacts: Mapping[str, ArtifactRecord], log_ref: str, debug_bundle: str
                  ) -> tuple[str | None, str | None]:
    """The store's keys of the run's log (its failing stage's, else its last stage's) and of
    its debug bundle, among `artifacts` (local path -> what was stored); None for one not
    stored."""

    def key(path: str) -> str | None:
        stored = artifacts.get(path) if path else None
        return stored.key if stored is not None else None

    return key(log_ref), key(debug_bundle)


@dataclass(frozen=True)
class RunLinks:
    run: str = ""
    log: str = ""
    bundle: str = ""

    def to_dict(self) -> dict[str, str]:
        return {name: url for name, url in asdict(self).items() if url}


@dataclass(frozen=True)
class Linking:
    """How a view links: the Dagster UI's base URL, and the artifact store's links (None: no
    store to link to)."""

    ui_url: str = ""
    link: Link | None = None

    def of(self, run_id: str, log_key: str | None = None, bundle_key: str | None = None
           ) -> RunLinks:
        return RunLinks(run_link(self.ui_url, run_id), self.artifact(log_key),
                        self.artifact(bundle_key))

    def artifact(self, key: str | None) -> str:
        return self.link(key) if self.link and key else ""

    def of_row(self, row: Mapping[str, Any]) -> RunLinks:
        """A history row's (or a summary's run's) links."""
        return self.of(row.get("run_id") or "", row.get("log_key"), row.get("bundle_key"))


NO_LINKS = Linking()  # a view that links nothing (a test's, a benchmark's)
