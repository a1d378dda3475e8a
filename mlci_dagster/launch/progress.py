"""`mlci run`'s progress: a line per partition with its current stage and elapsed time, read
from each run's events in the Dagster instance; while a partition builds its image on this
machine, the build's own last output line. On a terminal the lines are redrawn in place (rich);
into a pipe or a CI log each change is a line of its own, and a long stage repeats its line
every 30 s with the build's progress."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import dagster as dg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mlci_dagster.providers.logpipe import log_tail
from mlci_dagster.registry import Registry
from mlci_dagster.stages.image import content_hash
from mlci_dagster.vocabulary import STAGES, split_partition_key

POLL_S = 0.5  # how often the runs' events are read
HEARTBEAT_S = 30.0  # a plain line repeats a long stage this often
NOTE_EVERY_S = 10.0  # and says a build's newer progress at most this often
BUILD_LINE_CHARS = 90
# A file's time is the kernel's coarse clock, a tick behind time.time(): a log written as the
# partition started still counts as written by this run.
MTIME_SLACK_S = 1.0


@dataclass
class Row:
    key: str
    state: str = "queued"  # queued, waiting, starting, <stage>, or the verdict
    started: float | None = None
    started_at: float = 0.0  # the same moment by the wall clock, to compare with files' times
    stage_since: float = 0.0
    note: str = ""  # a waiting partition's reason, a build's last line, a verdict's detail
    done: bool = False
    run_id: str = ""


def last_line(path: Path, chars: int = 4096) -> str:
    """The last non-empty line of a log being written (redacted as it was written)."""
    lines = log_tail(path, chars).splitlines()
    text = next((line.strip() for line in reversed(lines)
                 if line.strip() and not line.startswith("---")), "")
    return text if len(text) <= BUILD_LINE_CHARS else text[:BUILD_LINE_CHARS - 1] + "…"


def current_stage(instance: dg.DagsterInstance, run_id: str) -> str:
    """The stage a run is in: the first whose materialization it has not stored yet;
    `starting` before its step began."""
    events = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START,
                                                dg.DagsterEventType.ASSET_MATERIALIZATION})
    if not events:
        return "starting"
    done = {e.asset_materialization.asset_key.to_user_string() for e in events
            if e.asset_materialization is not None}
    return next((str(stage) for stage in STAGES if str(stage) not in done), "results")


@dataclass
class Progress:
    """Shown while `mlci run` runs; `live` decides in place (a terminal) or appended lines."""

    instance: dg.DagsterInstance
    registry: Registry
    keys: list[str]
    home: Path
    stream: IO[str] = field(default_factory=lambda: sys.stdout)
    live: bool | None = None
    rows: dict[str, Row] = field(init=False)
    _display: Any = field(init=False, default=None)
    _polled: float = field(init=False, default=0.0)
    _said: dict[str, tuple[str, str, float]] = field(init=False, default_factory=dict)
    _build_logs: dict[str, Path | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = {key: Row(key) for key in self.keys}
        if self.live is None:
            self.live = self.stream.isatty()
        if self.live:
            self._display = Live(self._table(), console=Console(file=self.stream),
                                 refresh_per_second=4, transient=False)
            self._display.start()

    # --- what the runner tells -------------------------------------------------------------

    def started(self, key: str, run_id: str) -> None:
        row = self.rows[key]
        row.state, row.started, row.run_id, row.note = "starting", time.monotonic(), run_id, ""
        row.started_at = time.time()
        row.stage_since = row.started
        self._show(row)

    def waiting(self, key: str, why: str) -> None:
        row = self.rows[key]
        row.state, row.note = "waiting", why
        self._show(row)

    def finished(self, key: str, verdict: str, detail: str) -> None:
        row = self.rows[key]
        row.state, row.note, row.done = verdict, detail, True
        if self.live:
            self._refresh()
        # The outcome line is printed by the caller either way: it is the run's record.

    def tick(self) -> None:
        """Reads the running partitions' stages (at most every POLL_S)."""
        now = time.monotonic()
        if now - self._polled < POLL_S:
            return
        self._polled = now
        for row in self.rows.values():
            if row.done or row.started is None:
                continue
            stage = current_stage(self.instance, row.run_id)
            if stage != row.state:
                row.state, row.stage_since, row.note = stage, now, ""
            if stage == "image":
                row.note = self._build_line(row)
            self._show(row)
        if self.live:
            self._refresh()

    def close(self) -> None:
        if self._display is not None:
            self._refresh()
            self._display.stop()

    # --- how it is shown -------------------------------------------------------------------

    def _build_line(self, row: Row) -> str:
        """The last line of the partition's image build log while a build writes it: written
        since the partition started (by its own build, or the one it waits for). A cached
        image's log is an old build's: nothing is being built, so no line."""
        if row.key not in self._build_logs:  # hashing the build's inputs once, not every tick
            self._build_logs[row.key] = self._build_log(row.key)
        log = self._build_logs[row.key]
        try:
            if log is None or log.stat().st_mtime < row.started_at - MTIME_SLACK_S:
                return ""
        except OSError:  # no build has written it yet
            return ""
        return last_line(log)

    def _build_log(self, key: str) -> Path | None:
        config = self.registry.configs[split_partition_key(key)[0]].config
        build = config.image.build
        if build is None or build.command is None:
            return None
        try:
            return self.home / "images" / f"{content_hash(self.registry.root, build)}.log"
        except (OSError, ValueError):
            return None

    def _show(self, row: Row) -> None:
        """Appends a line when a partition's state changes, or every HEARTBEAT_S of one state
        (with the build's progress); in place, nothing: the table is redrawn."""
        if self.live:
            return
        said, note, when = self._said.get(row.key, ("", "", 0.0))
        now = time.monotonic()
        if row.state == said and now - when < (NOTE_EVERY_S if row.note != note else
                                               HEARTBEAT_S):
            return
        self._said[row.key] = (row.state, row.note, now)
        elapsed = f" {now - row.started:.0f}s" if row.started is not None else ""
        note = f": {row.note}" if row.note else ""
        print(f"  {row.key}: {row.state}{elapsed}{note}", file=self.stream, flush=True)

    def _refresh(self) -> None:
        if self._display is not None:
            self._display.update(self._table())

    def _table(self) -> Table:
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for column in ("partition", "stage", "elapsed", ""):
            table.add_column(column, no_wrap=True, overflow="ellipsis")
        now = time.monotonic()
        for row in self.rows.values():
            elapsed = "" if row.started is None else (
                f"{now - row.started:.0f}s" if not row.done else "")
            style = {"passed": "green", "FAILED": "red", "LOST": "red", "NOT RUN": "red",
                     "SKIPPED": "yellow", "CANCELED": "yellow"}.get(row.state, "")
            table.add_row(row.key, f"[{style}]{row.state}[/]" if style else row.state,
                          elapsed, row.note)
        return table
