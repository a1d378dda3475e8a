"""One summary per SHA and tier: the state of its run set (pending once a run started; success
or failure once every run finished), worded for a GitHub commit status and kept as a record.
A partition's deflake attempts are one: pending while a failure awaits its rerun, passed (and
said flaky) when a rerun passed. A quarantined failure does not fail the set, and is named;
an expired quarantine counts again, and says so. Pure: the commit_status sensor gathers the
runs and posts what this says."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from mlci_dagster.history.links import run_link
from mlci_dagster.registry.quarantine import Quarantine

DESCRIPTION_CHARS = 140  # GitHub cuts a commit status's description there
PENDING, SUCCESS, FAILURE = "pending", "success", "failure"


def status_context(tier: str) -> str:
    """The commit status's stable name: one per tier, updated in place by GitHub."""
    return f"mlci / {tier}"


@dataclass(frozen=True)
class PartitionRun:
    partition: str
    run_id: str
    status: str  # the Dagster run status: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED...
    failed_stage: str | None = None
    awaiting_rerun: bool = False  # failed, and its deflake rerun is still to come
    flaky: bool = False  # passed on a rerun, after failing
    failing_tests: tuple[str, ...] = ()  # every failing test's id, when the record named all
    quarantined: str = ""  # its failure is quarantined: by what
    quarantine_expired: str = ""  # its failure was quarantined until a day now past
    finished_at: float | None = None  # when its results record was written

    @property
    def started(self) -> bool:
        return self.status not in ("QUEUED", "NOT_STARTED", "STARTING", "MANAGED")

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCESS", "FAILURE", "CANCELED") and not self.awaiting_rerun

    @property
    def passed(self) -> bool:
        return self.status == "SUCCESS" and self.failed_stage is None

    @property
    def counts_as_passed(self) -> bool:
        """Passed, or failed under an active quarantine."""
        return self.passed or bool(self.quarantined)


@dataclass(frozen=True)
class CommitSummary:
    sha: str
    tier: str
    state: str
    expected: int
    runs: tuple[PartitionRun, ...]
    dagster_url: str

    @property
    def context(self) -> str:
        return status_context(self.tier)

    def run_url(self, run: PartitionRun) -> str:
        return run_link(self.dagster_url, run.run_id)

    @property
    def target_url(self) -> str:
        """The first failing run, else the first run: where a reader starts."""
        failing = [r for r in self.runs if r.finished and not r.passed]
        return self.run_url((failing or list(self.runs))[0])

    @property
    def description(self) -> str:
        passed = sum(r.passed for r in self.runs)
        if self.state == PENDING:
            done = sum(r.finished for r in self.runs)
            text = f"{done} of {self.expected} partitions finished, {passed} passed"
            rerunning = [r.partition for r in self.runs if r.awaiting_rerun]
            if rerunning:
                text += f", {len(rerunning)} rerunning"
        else:
            failing = [r for r in self.runs if not r.counts_as_passed]
            text = f"{passed} of {self.expected} partitions passed"
            quarantined = [r.partition for r in self.runs if r.quarantined]
            if quarantined:
                text += f", {len(quarantined)} quarantined: {', '.join(quarantined)}"
            flaky = [r.partition for r in self.runs if r.flaky]
            if flaky:
                text += f", {len(flaky)} flaky: {', '.join(flaky)}"
            if failing:
                text += "; failing: " + ", ".join(
                    f"{r.partition} ({r.failed_stage or r.status.lower()}"
                    + (f"; {r.quarantine_expired}" if r.quarantine_expired else "") + ")"
                    for r in failing)
        return text if len(text) <= DESCRIPTION_CHARS else text[:DESCRIPTION_CHARS - 1] + "…"

    def markdown(self) -> str:
        lines = [f"**{self.context}** on `{self.sha[:12]}`: {self.state}", "",
                 "| partition | status | failing stage | note | run |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r.partition} | {r.status.lower()} | {r.failed_stage or '-'} | "
                  f"{note(r) or '-'} | [{r.run_id[:8]}]({self.run_url(r)}) |" for r in self.runs]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"sha": self.sha, "tier": self.tier, "state": self.state,
                "expected": self.expected, "context": self.context,
                "partitions": [asdict(r) | {"url": self.run_url(r)} for r in self.runs]}


def note(run: PartitionRun) -> str:
    """What the markdown table says beside a partition's status."""
    return run.quarantined and f"quarantined: {run.quarantined}" or run.quarantine_expired \
        or ("flaky: passed on rerun" if run.flaky else "") \
        or ("rerun due" if run.awaiting_rerun else "")


def with_quarantine(run: PartitionRun, quarantine: Quarantine, now: float) -> PartitionRun:
    """The run, its failure marked quarantined (or its quarantine expired) as `quarantine`
    says at `now`."""
    if run.passed or not run.finished:
        return run
    entries = quarantine.covering(run.partition, run.failing_tests)
    if not entries:
        return run
    expired = [e for e in entries if not e.active(now)]
    if expired:
        return replace(run, quarantine_expired=f"quarantine expired {expired[0].expires}")
    return replace(run, quarantined="; ".join(e.text() for e in entries))


def summarize(sha: str, tier: str, expected: int, runs: list[PartitionRun],
              dagster_url: str, quarantine: Quarantine | None = None,
              now: float | None = None) -> CommitSummary | None:
    """The run set's state; None while none of its runs has started. A failure quarantined
    at `now` does not fail it (default: when the set's last run finished, so a set judged
    once is judged alike however late it is summed up again)."""
    if not any(r.started for r in runs):
        return None
    if now is None:
        now = max((r.finished_at for r in runs if r.finished_at), default=time.time())
    runs = sorted((with_quarantine(r, quarantine or Quarantine(), now) for r in runs),
                  key=lambda r: r.partition)
    if len([r for r in runs if r.finished]) < expected:
        state = PENDING
    else:
        state = SUCCESS if all(r.counts_as_passed for r in runs) else FAILURE
    return CommitSummary(sha, tier, state, expected, tuple(runs), dagster_url)
