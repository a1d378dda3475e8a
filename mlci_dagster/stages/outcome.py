"""The StageOutcome record: what one stage did, recorded and never raised."""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mlci_dagster.common.redact import NO_SECRETS, Redactor
from mlci_dagster.common.summary import summarize
from mlci_dagster.stages.details import DETAILS, Details
from mlci_dagster.vocabulary import FailureKind, Stage, Status

D = TypeVar("D", bound=Details)


@dataclass
class StageOutcome(Generic[D]):
    """What one stage did for one partition: recorded, never raised. Its `details` are the
    stage's own (stages/details.py); a stage that did not run has them empty."""

    stage: Stage
    status: Status
    started_at: float
    duration_s: float
    failure_kind: FailureKind | None = None
    error_summary: str = ""
    log_ref: str = ""
    details: D = field(default=None)  # type: ignore[assignment]  # None: the stage's empty
    # The stage was stopped by an interrupt (Ctrl-C, a terminated run) before it finished.
    interrupted: bool = False

    def __post_init__(self) -> None:
        if self.details is None:
            self.details = DETAILS[self.stage]()  # type: ignore[assignment]

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    def to_dict(self) -> dict[str, Any]:
        return {"stage": str(self.stage), "status": str(self.status),
                "started_at": self.started_at, "duration_s": self.duration_s,
                "failure_kind": str(self.failure_kind) if self.failure_kind else None,
                "error_summary": self.error_summary, "log_ref": self.log_ref,
                "details": self.details.model_dump(mode="json"),
                "interrupted": self.interrupted}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageOutcome:
        kind = data.get("failure_kind")
        stage = Stage(data["stage"])
        return cls(
            stage=stage,
            status=Status(data["status"]),
            started_at=data["started_at"],
            duration_s=data["duration_s"],
            failure_kind=FailureKind(kind) if kind else None,
            error_summary=data.get("error_summary", ""),
            log_ref=data.get("log_ref", ""),
            details=DETAILS[stage].model_validate(data.get("details") or {}),
            interrupted=bool(data.get("interrupted", False)),
        )


# A command that is not there, or not runnable, is named by the test's own files.
NOT_RUNNABLE = {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR}


def start_failure_kind(error: OSError) -> FailureKind:
    """Why a command could not start: the test configuration's fault (`config`) when what it
    names does not exist or cannot run, else the machine's (`infra`: no memory, no pids)."""
    return FailureKind.CONFIG if error.errno in NOT_RUNNABLE else FailureKind.INFRA


def skipped(stage: Stage, reason: str) -> StageOutcome:
    """The outcome of a stage whose prerequisite did not pass."""
    return StageOutcome(stage, Status.SKIP, time.time(), 0.0, error_summary=reason)


def interrupted(clock: StageClock, why: str) -> StageOutcome:
    """The outcome of a stage stopped by an interrupt before it finished: no verdict."""
    return StageOutcome(clock.stage, Status.SKIP, clock.started_at, clock.elapsed(),
                        error_summary=f"interrupted after {clock.elapsed():.1f}s: {why}",
                        interrupted=True)


class StageClock:
    """Times a stage and builds its outcome, so every stage reports start and duration alike."""

    def __init__(self, stage: Stage, redactor: Redactor = NO_SECRETS) -> None:
        self.stage = stage
        self.redactor = redactor
        self.started_at = time.time()
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def passed(self, details: D | None = None, log_ref: str = "") -> StageOutcome[D]:
        return StageOutcome(
            self.stage, Status.PASS, self.started_at, self.elapsed(), log_ref=log_ref,
            details=self._redacted(details),
        )

    def failed(self, kind: FailureKind, summary: str, log_ref: str = "",
               details: D | None = None) -> StageOutcome[D]:
        return StageOutcome(
            self.stage, Status.FAIL, self.started_at, self.elapsed(), failure_kind=kind,
            # Redact before cutting, so no part of a secret survives at the cut.
            error_summary=summarize(self.redactor.text(summary)), log_ref=log_ref,
            details=self._redacted(details),
        )

    def _redacted(self, details: D | None) -> D | None:
        """A copy with every secret's value replaced, validated again as the stage's."""
        if details is None:
            return None
        return type(details).model_validate(self.redactor.value(details.model_dump()))
