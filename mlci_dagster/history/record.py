"""The results record: one run of one partition, as `results` stores it in the event log and as
history, reports and notifications read it back (validated, so a malformed record is named, not
half-read)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from mlci_dagster.vocabulary import (
    FailureKind,
    Stage,
    Status,
    canceled,
    failed_stage_of,
    judged,
    out_of_line,
    partition_key,
    passed,
    skipped,
)

MAX_FAILING_TESTS = 50  # the failing tests a record names; the report has them all


class _Record(BaseModel):
    # Records written by a newer version may carry fields this one does not know: keep reading.
    model_config = ConfigDict(extra="ignore", frozen=True)


class StageRecord(_Record):
    status: Status
    duration_s: float
    failure_kind: FailureKind | None = None
    error_summary: str = ""
    log_ref: str = ""


class PipelineRecord(_Record):
    passed: bool
    duration_s: float


class TestCounts(_Record):
    """How the tests the pipelines reported went."""

    __test__ = False  # a name pytest would otherwise collect

    passed: int = 0
    failed: int = 0  # an assertion failed
    errors: int = 0  # crashed, or its setup did
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped

    def __add__(self, other: TestCounts) -> TestCounts:
        return TestCounts(passed=self.passed + other.passed, failed=self.failed + other.failed,
                          errors=self.errors + other.errors, skipped=self.skipped + other.skipped)


class FailingTest(_Record):
    """A test that failed: its pipeline, its stable id, why (redacted, bounded) and its
    failure signature."""

    pipeline: str
    id: str
    status: Literal["fail", "error"]
    message: str = ""
    signature: str = ""


def failing_tests_text(failing: list[FailingTest], total_failing: int, total: int,
                       limit: int = 3, compact: bool = False) -> str:
    """`2 of 41 tests failing: <id> (<message's first line>), ...`; "" when none failed.
    `compact`: each test by its name alone, its message cut shorter (a summary's first line)."""
    if not total_failing:
        return ""
    cut = 60 if compact else 120

    def said(message: str) -> str:  # its first line; cut at a word, and saying so
        line = message.splitlines()[0] if message else ""
        return line if len(line) <= cut else line[:cut].rsplit(" ", 1)[0] + " …"

    named = [(t.id.rsplit(" :: ", 1)[-1] if compact else t.id)
             + (f" ({said(t.message)})" if t.message else "") for t in failing[:limit]]
    more = total_failing - len(named)
    return (f"{total_failing} of {total} tests failing: " + ", ".join(named)
            + (f", and {more} more" if more else ""))


class MetricRecord(_Record):
    value: float
    direction: Literal["lower_is_better", "higher_is_better"]


class ArtifactRecord(_Record):
    """A piece of a run's evidence in the artifact store: what it is, its key there, the bytes
    stored (truncated with a note past the limit) and their sha256, and where it is."""

    kind: Literal["log", "bundle", "screenshot", "report"]
    key: str
    size: int
    sha256: str
    truncated: bool = False
    url: str


class PendingArtifact(_Record):
    """A piece of a run's evidence the store did not take: what and where it is, the key it
    is to have, and why it is not there yet."""

    kind: Literal["log", "bundle", "screenshot", "report"]
    path: str
    key: str
    why: str


class ResultRecord(_Record):
    """`status` is `pass`, `fail-<first failing stage>` (the failure fields tell of that stage),
    `skip` (refused before it began; `error_summary` says why) or `canceled` (interrupted before
    it finished, its sandbox torn down; `error_summary` says where)."""

    partition: str
    config: str
    engine: str
    config_id: str
    status: str
    failed_stage: Stage | None = None
    failure_kind: FailureKind | None = None
    owner: str | None = None
    error_summary: str = ""
    log_ref: str = ""
    debug_bundle: str = ""
    image_digest: str | None = None
    trigger: str
    code_version: str
    run_id: str
    started_at: float
    finished_at: float
    duration_s: float
    stages: dict[Stage, StageRecord]
    pipelines: dict[str, PipelineRecord] = {}
    metrics: dict[str, MetricRecord] = {}
    billed_s: float = 0.0  # how long the sandbox existed (sandbox stage to end of teardown)
    cost_usd: float | None = None  # billed_s at the rates in mlci.yaml; None: no rate known
    preempted: bool = False  # a spot node was reclaimed mid-run (always an infra failure)
    batch: str = ""  # what launched it with others: `nightly 2026-03-09`, `commit 1a2b3c4d5e`
    sha: str | None = None  # the commit it tested, when its launch named one
    # Deflake reruns: which attempt of its cell this is (2 and on rerun the first attempt,
    # `rerun_of`), and whether this failure is due another attempt (its reruns policy allows
    # one, and it failed for the product or a timeout): no verdict until that one is recorded.
    attempt: int = 1
    rerun_of: str | None = None
    rerun_due: bool = False
    # The tests the pipelines reported: their counts, the failing ones (at most
    # MAX_FAILING_TESTS, of `failing_tests_total`), never the whole report; each report that
    # could not be read, naming its pipeline and file; where every case is kept (pipeline ->
    # a JUnit XML in the run's log directory: the test history reads it).
    tests: TestCounts = TestCounts()
    failing_tests: list[FailingTest] = []
    failing_tests_total: int = 0
    test_report_problems: list[str] = []
    test_reports: dict[str, str] = {}
    # The run's evidence in the artifact store (its local path -> what was stored there), and
    # each piece that could not be uploaded yet (the artifact_upload sensor retries them).
    artifacts: dict[str, ArtifactRecord] = {}
    artifacts_pending: list[PendingArtifact] = []

    @model_validator(mode="after")
    def _consistent(self) -> ResultRecord:
        if self.partition != partition_key(self.config, self.engine):
            raise ValueError(f"partition: {self.partition!r} is not config|engine "
                             f"({self.config!r}, {self.engine!r})")
        if not passed(self.status) and failed_stage_of(self.status) != self.failed_stage:
            raise ValueError(f"status: {self.status!r} does not name failed_stage "
                             f"{self.failed_stage!r}")
        return self

    @property
    def passed(self) -> bool:
        return passed(self.status)

    @property
    def skipped(self) -> bool:
        return skipped(self.status)

    @property
    def canceled(self) -> bool:
        return canceled(self.status)

    @property
    def out_of_line(self) -> bool:
        """A culprit search's rerun of an older commit: it counts in no partition's state."""
        return out_of_line(self.trigger)

    @property
    def cell(self) -> str:
        """The run id of its cell's first attempt: what its reruns name."""
        return self.rerun_of or self.run_id

    @property
    def awaiting_rerun(self) -> bool:
        """A failure that its rerun will confirm or call a flake: no verdict yet."""
        return self.rerun_due and not self.passed

    @property
    def judged(self) -> bool:
        """A verdict on what it tested (pass or fail), which the history's rules count."""
        return judged(self.status)

    def failing_tests_text(self, limit: int = 3) -> str:
        """`2 of 41 tests failing: <id> (<message's first line>), ...`; "" when none failed."""
        return failing_tests_text(self.failing_tests, self.failing_tests_total,
                                  self.tests.total, limit)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
