"""One summary per SHA and tier: the state of its run set (pending once a run started; success
or failure once every run finished), worded for a GitHub commit status and kept as a record.
Pure: the commit_status sensor gathers the runs and posts what this says."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlci_dagster.notify.message import run_url

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

    @property
    def started(self) -> bool:
        return self.status not in ("QUEUED", "NOT_STARTED", "STARTING", "MANAGED")

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCESS", "FAILURE", "CANCELED")

    @property
    def passed(self) -> bool:
        return self.status == "SUCCESS" and self.failed_stage is None


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
        return run_url(self.dagster_url, run.run_id)

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
        else:
            failing = [r for r in self.runs if not r.passed]
            text = f"{passed} of {self.expected} partitions passed"
            if failing:
                text += "; failing: " + ", ".join(
                    f"{r.partition} ({r.failed_stage or r.status.lower()})" for r in failing)
        return text if len(text) <= DESCRIPTION_CHARS else text[:DESCRIPTION_CHARS - 1] + "…"

    def markdown(self) -> str:
        lines = [f"**{self.context}** on `{self.sha[:12]}`: {self.state}", "",
                 "| partition | status | failing stage | run |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.partition} | {r.status.lower()} | {r.failed_stage or '-'} | "
                  f"[{r.run_id[:8]}]({self.run_url(r)}) |" for r in self.runs]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"sha": self.sha, "tier": self.tier, "state": self.state,
                "expected": self.expected, "context": self.context,
                "partitions": [asdict(r) | {"url": self.run_url(r)} for r in self.runs]}


def summarize(sha: str, tier: str, expected: int, runs: list[PartitionRun],
              dagster_url: str) -> CommitSummary | None:
    """The run set's state; None while none of its runs has started."""
    if not any(r.started for r in runs):
        return None
    runs = sorted(runs, key=lambda r: r.partition)
    if len([r for r in runs if r.finished]) < expected:
        state = PENDING
    else:
        state = SUCCESS if all(r.passed for r in runs) else FAILURE
    return CommitSummary(sha, tier, state, expected, tuple(runs), dagster_url)
