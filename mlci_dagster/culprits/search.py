"""A culprit search: the regression it bisects (one partition, one failure signature, the
commits after its last pass up to its first failure), how each rerun's result counts, what a
search may cost before it starts, and how its outcome is said. Dagster-free: `searches.py` reads
the reruns from the instance and launches the next ones.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from mlci_dagster.culprits.bisect import Bisection, Rerun, RerunStatus, State, Verdict
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.history.signature import signature_of
from mlci_dagster.vocabulary import FailureKind


class SearchRefused(ValueError):
    """A search that may not start, or has nothing to search: the message says why."""


class Search(BaseModel):
    """One search, as it is recorded when it starts: what it bisects and within what bounds.
    `commits` are after `last_pass` up to the first failing commit (its last), oldest first."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    partition: str
    signature: str
    signature_text: str
    last_pass: str
    commits: list[str]
    subjects: dict[str, str] = {}
    last_pass_run: str = ""
    first_fail_run: str = ""
    max_runs: int
    width: int
    driver: str  # "sensor": the culprit_search sensor advances it; "cli": `mlci culprit find`
    started_at: float

    @staticmethod
    def id_of(partition: str, signature: str, last_pass: str, first_fail: str) -> str:
        """The same regression is the same search, whoever starts it."""
        text = "\n".join((partition, signature, last_pass, first_fail))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def bisection(self, reruns: list[Rerun]) -> Bisection:
        return Bisection(self.last_pass, list(self.commits), reruns, self.max_runs)

    def commit_text(self, sha: str) -> str:
        subject = self.subjects.get(sha, "")
        return f"{sha[:12]} {subject}".strip()


def rerun_status(finished: bool, record: ResultRecord | None, signature: str) -> RerunStatus:
    """How one rerun counts: in progress until its run is over; failed only with the
    regression's own signature; a run that recorded no verdict (lost, interrupted, refused) or
    failed for infrastructure counts as an infra failure."""
    if not finished:
        return RerunStatus.IN_PROGRESS
    if record is None or not record.judged or record.failure_kind is FailureKind.INFRA:
        return RerunStatus.INFRA_FAILED
    if record.passed:
        return RerunStatus.PASSED
    found = signature_of(record.failed_stage, record.failure_kind, record.error_summary)
    return RerunStatus.FAILED if found is not None and found.id == signature \
        else RerunStatus.OTHER_SIGNATURE


def worst_case_runs(commits: int, width: int) -> int:
    """The most reruns a search of `commits` (the last known to fail) may take at `width` runs
    a round: each round splits what is left `width + 1` ways, then two runs verify."""
    rounds = 0 if commits <= 1 else math.ceil(math.log(commits, width + 1) - 1e-9)
    return width * rounds + 2


def fitting_width(commits: int, width: int, max_runs: int) -> int:
    """The widest search, at most `width`, whose worst case keeps within `max_runs`; 0: none."""
    return next((w for w in range(width, 0, -1) if worst_case_runs(commits, w) <= max_runs), 0)


def budget_refusal(runs: int, run_usd: float, month_usd: float, monthly_budget: float | None
                   ) -> str | None:
    """Why a search of up to `runs` reruns at `run_usd` each may not start: the month
    (`month_usd` so far) would pass its budget. None: it may."""
    if monthly_budget is None or run_usd <= 0:
        return None
    total = month_usd + runs * run_usd
    if total <= monthly_budget:
        return None
    return (f"budget: up to {runs} reruns at ${run_usd:.4f} each would take the month to "
            f"${total:.4f}, over budget.monthly_usd ${monthly_budget:g} (spent or in progress: "
            f"${month_usd:.4f})")


def verdict_text(search: Search, verdict: Verdict, reruns: dict[str, list[str]]) -> str:
    """`culprit: <sha> <subject>, confirmed by runs a1b2c3d4 (fails), e5f6a7b8 (its parent
    passes)`, or why the search stopped. `reruns`: commit -> the run ids that tested it."""
    if verdict.state is State.CONFIRMED and verdict.culprit is not None:
        parent = _parent(search, verdict.culprit)
        runs = ", ".join([*(f"{r[:8]} (fails)" for r in reruns.get(verdict.culprit, [])[-1:]),
                          *(f"{r[:8]} (its parent {parent[:12]} passes)"
                            for r in reruns.get(parent, [])[-1:])])
        return f"culprit: {search.commit_text(verdict.culprit)}, confirmed by runs {runs}"
    if verdict.state is State.STOPPED:
        return f"no culprit: {verdict.why}"
    if verdict.state is State.CULPRIT and verdict.culprit is not None:
        return f"culprit {search.commit_text(verdict.culprit)}: verifying"
    return f"{len(verdict.candidates)} candidate commit(s) left"


def _parent(search: Search, sha: str) -> str:
    at = search.commits.index(sha)
    return search.commits[at - 1] if at else search.last_pass


def summary(search: Search, verdict: Verdict, reruns: list[tuple[Rerun, str]]
            ) -> dict[str, Any]:
    """What a search's observation records: the search, each rerun with its run id, the
    verdict and its text."""
    by_commit: dict[str, list[str]] = {}
    for rerun, run_id in reruns:
        by_commit.setdefault(rerun.commit, []).append(run_id)
    return {"search": search.model_dump(mode="json"), "state": str(verdict.state),
            "culprit": verdict.culprit, "why": verdict.why,
            "candidates": list(verdict.candidates),
            "reruns": [{"commit": r.commit, "status": str(r.status), "kind": str(r.kind),
                        "run_id": run_id} for r, run_id in reruns],
            "text": verdict_text(search, verdict, by_commit)}

