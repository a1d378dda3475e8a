"""Bisection of a regression range, as LUCI Bisection's nth-section picks its reruns
(luci-go `bisection/nthsectionsnapshot`): pure state in, the next runs or a verdict out.

The range: the commits (or images) after the last pass up to the first failure, oldest first;
the last one failed in the run that opened the regression, the one before the first passed.
Reruns so far each name a commit, how they went and why they ran (to bisect, or to verify a
culprit). With `slots` runs free, the next ones split what is left of the range so that the
largest remaining part is as small as possible; runs in progress count as splits, so nothing
runs twice. The culprit is the oldest commit that fails, once the range is one commit; it is
confirmed when a rerun of it fails and one of its parent passes.

It stops early, and says why, when a pass is newer than a failure (a flake, or another cause:
no culprit), after more than MAX_INFRA_FAILURES infra failures (a consistent outage must not
drain the pool), when a rerun skipped the failing test or failed with another signature, or
when the next runs would pass the maximum number of runs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_INFRA_FAILURES = 2


class RerunStatus(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"  # with the regression's own signature
    INFRA_FAILED = "infra_failed"
    IN_PROGRESS = "in_progress"
    TEST_SKIPPED = "test_skipped"  # the failing test did not run there
    OTHER_SIGNATURE = "other_signature"  # failed, but not as the regression does


class RerunKind(enum.StrEnum):
    BISECTION = "bisection"
    VERIFICATION = "verification"  # of a culprit: it again, and its parent


@dataclass(frozen=True)
class Rerun:
    commit: str
    status: RerunStatus
    kind: RerunKind = RerunKind.BISECTION


class State(enum.StrEnum):
    RUNNING = "running"  # more runs to go: `next_runs` says which
    CULPRIT = "culprit"  # found, its verification to run
    CONFIRMED = "confirmed"  # found and verified
    STOPPED = "stopped"  # no culprit: `why` says why


@dataclass(frozen=True)
class Verdict:
    state: State
    candidates: tuple[str, ...] = ()  # where the culprit still may be, oldest first
    culprit: str | None = None
    why: str = ""


@dataclass
class Bisection:
    """`commits`: after the last pass up to the first failure, oldest first; `last_pass`: the
    commit before them that passed."""

    last_pass: str
    commits: list[str]
    reruns: list[Rerun] = field(default_factory=list)
    max_runs: int = 10

    def __post_init__(self) -> None:
        if not self.commits:
            raise ValueError("an empty range: nothing to bisect")
        if len(set(self.commits)) != len(self.commits) or self.last_pass in self.commits:
            raise ValueError("a commit appears twice in the range")

    def _known(self, kind: RerunKind) -> dict[int, set[RerunStatus]]:
        where = {c: i for i, c in enumerate(self.commits)}
        where[self.last_pass] = -1
        known: dict[int, set[RerunStatus]] = {}
        for rerun in self.reruns:
            if rerun.kind is kind and rerun.commit in where:
                known.setdefault(where[rerun.commit], set()).add(rerun.status)
        return known

    def verdict(self) -> Verdict:
        for rerun in self.reruns:
            if rerun.status is RerunStatus.TEST_SKIPPED:
                return Verdict(State.STOPPED, why=f"the failing test was skipped at {rerun.commit}")
            if rerun.status is RerunStatus.OTHER_SIGNATURE:
                return Verdict(State.STOPPED,
                               why=f"{rerun.commit} failed with another signature")
        infra = sum(r.status is RerunStatus.INFRA_FAILED for r in self.reruns)
        if infra > MAX_INFRA_FAILURES:
            return Verdict(State.STOPPED, why=f"{infra} reruns failed for infrastructure")
        known = self._known(RerunKind.BISECTION)
        failed = [i for i, s in known.items() if RerunStatus.FAILED in s] + [len(self.commits) - 1]
        passed = [i for i, s in known.items() if RerunStatus.PASSED in s] + [-1]
        if max(passed) > min(failed):
            newer = self.commits[max(passed)]
            return Verdict(State.STOPPED, why=f"{newer} passed after an older commit failed: "
                                              "a flake or another cause, no culprit")
        low, high = max(passed) + 1, min(failed)
        candidates = tuple(self.commits[low:high + 1])
        if low < high:
            return Verdict(State.RUNNING, candidates)
        culprit = self.commits[low]
        parent = self.commits[low - 1] if low else self.last_pass
        verified = {r.commit: r.status for r in self.reruns
                    if r.kind is RerunKind.VERIFICATION
                    and r.status is not RerunStatus.IN_PROGRESS}
        if culprit in verified and parent in verified:
            if (verified[culprit], verified[parent]) == (RerunStatus.FAILED, RerunStatus.PASSED):
                return Verdict(State.CONFIRMED, candidates, culprit)
            return Verdict(State.STOPPED, candidates, culprit,
                           f"not confirmed: {culprit} {verified[culprit]} and its parent "
                           f"{parent} {verified[parent]} on a rerun")
        return Verdict(State.CULPRIT, candidates, culprit)

    def next_runs(self, slots: int) -> list[Rerun]:
        """The runs to start now, at most `slots`, none already started; [] when the verdict
        is not RUNNING or CULPRIT, or the maximum number of runs would be passed (`verdict`
        then stays as it is: `runs_left` says it)."""
        verdict = self.verdict()
        if verdict.state is State.CULPRIT:
            parent = self.commits[self.commits.index(verdict.culprit) - 1] \
                if verdict.culprit != self.commits[0] else self.last_pass
            started = {r.commit for r in self.reruns if r.kind is RerunKind.VERIFICATION}
            wanted = [Rerun(c, RerunStatus.IN_PROGRESS, RerunKind.VERIFICATION)
                      for c in (verdict.culprit, parent) if c not in started]
            return wanted[:min(slots, self.runs_left)]
        if verdict.state is not State.RUNNING:
            return []
        in_progress = {i for i, s in self._known(RerunKind.BISECTION).items()
                       if RerunStatus.IN_PROGRESS in s}
        low, length = self.commits.index(verdict.candidates[0]), len(verdict.candidates)
        points = dividers(length, {i - low for i in in_progress if low <= i < low + length},
                          min(slots, self.runs_left))
        return [Rerun(self.commits[low + i], RerunStatus.IN_PROGRESS) for i in points]

    @property
    def runs_left(self) -> int:
        return max(0, self.max_runs - len(self.reruns))


def dividers(length: int, taken: set[int], count: int) -> list[int]:
    """`count` new positions to test in a range of `length` candidates (0 oldest; the last is
    known to fail, so it is never tested) so that the largest part the results can leave is
    as small as possible; `taken` positions (runs in progress) already split it."""
    cuts = sorted(taken | {-1, length - 1})  # -1: the last pass; length - 1: a known failure
    # Each gap between cuts (exclusive of its left cut, inclusive of its right) is a part;
    # a part of size n with k new points inside leaves parts of ceil(n / (k + 1)) at most.
    gaps = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b - a > 1]
    extra = [0] * len(gaps)

    def worst(i: int, k: int) -> int:
        size = gaps[i][1] - gaps[i][0]
        return -(-size // (k + 1))

    for _ in range(count):
        if not gaps:
            break
        best = max(range(len(gaps)), key=lambda i: (worst(i, extra[i]), -i))
        if worst(best, extra[best]) <= 1 or extra[best] >= gaps[best][1] - gaps[best][0] - 1:
            break
        extra[best] += 1
    points = []
    for (a, b), k in zip(gaps, extra, strict=True):
        size = b - a
        # k points splitting positions a+1 .. b into k+1 parts of near-equal size.
        points += [a + round(size * j / (k + 1)) for j in range(1, k + 1)]
    return sorted(set(points) - taken - {length - 1})
