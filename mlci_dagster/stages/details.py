"""What each stage hands to the next and records, typed: the image it gave, the sandbox's
handle, the pipelines' results and outputs, the routes checked, what teardown verified.

Validated where they cross a boundary: read back from a stored record (`StageOutcome.from_dict`)
and on every write, since the redacted copy an outcome keeps is validated again. The stored
form (asset metadata, the debug bundle's `outcomes.json`) is `model_dump(mode="json")`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mlci_dagster.history.record import MAX_FAILING_TESTS, FailingTest, TestCounts
from mlci_dagster.junit.read import TestCase, TestStatus
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import DestroyReport, SandboxHandle
from mlci_dagster.vocabulary import Stage


class Details(BaseModel):
    """A stage's details: nothing beyond its fields, so a misspelt key fails where it is set."""

    model_config = ConfigDict(extra="forbid")


class ImageDetails(Details):
    """The image the stage gave: its digest, and its `ref` (pulled or pushed) or its `path`
    (built on this machine); a CodeBuild build's id and, when it failed, its status."""

    digest: str | None = None
    ref: str = ""
    path: str = ""
    cached: bool = False
    built_at: float | None = None
    build_id: str | None = None
    build_status: str | None = None

    def attributes(self) -> dict[str, Any]:
        """What `${image.<attribute>}` reaches: the attributes the way the image was given
        has (IMAGE_ATTRIBUTES in common/templating.py)."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"build_status"})


class SandboxDetails(Details):
    """The sandbox's handle (set whenever a sandbox may exist, even when the stage failed) and
    what readiness checked, per service or object."""

    handle: SandboxHandle | None = None
    probes: list[dict[str, Any]] = Field(default_factory=list)


class PipelineTests(Details):
    """What one pipeline's test reports say: the counts, the failing tests (at most
    MAX_FAILING_TESTS, of `failing_total`), a problem per report that could not be read, and
    where every case is kept (`report`: one JUnit XML in the run's log directory)."""

    counts: TestCounts = TestCounts()
    failing: list[FailingTest] = Field(default_factory=list)
    failing_total: int = 0
    problems: list[str] = Field(default_factory=list)
    report: str = ""

    def add(self, pipeline: str, cases: Iterable[TestCase]) -> None:
        counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
        for case in cases:
            counts[COUNTED[case.status]] += 1
            if case.failed:
                self.failing_total += 1
                if len(self.failing) < MAX_FAILING_TESTS:
                    self.failing.append(FailingTest(
                        pipeline=pipeline, id=case.id, status=str(case.status),
                        message=case.message, signature=case.signature))
        self.counts = self.counts + TestCounts(**counts)


COUNTED = {TestStatus.PASS: "passed", TestStatus.FAIL: "failed", TestStatus.ERROR: "errors",
           TestStatus.SKIP: "skipped"}


class PipelineRunsDetails(Details):
    """Each pipeline's result, in order, up to the first that failed; their outputs by name;
    what the test reports of those that declare any say."""

    pipelines: list[PipelineResult] = Field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tests: dict[str, PipelineTests] = Field(default_factory=dict)


@dataclass
class RouteResult:
    """One route checked: what was asked, what came back, every expectation it missed
    (`problems`: the product's) and what kept it from being checked (`infra`)."""

    url: str
    kind: str = "http"  # or "browser"
    status: int | None = None
    latency_ms: float | None = None
    problems: list[str] = field(default_factory=list)
    infra: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)  # a browser's
    screenshot: str | None = None  # a browser's, whether or not the page rendered
    screenshot_travels: bool = True  # to the artifact store and the debug bundle


class UiSmokeDetails(Details):
    routes: list[RouteResult] = Field(default_factory=list)


class SandboxTeardown(Details):
    """One sandbox torn down: the logs collected first and what its destroy verified."""

    sandbox_id: str
    artifacts: list[str] = Field(default_factory=list)
    report: DestroyReport


class TeardownDetails(Details):
    """The sandboxes torn down; the debug bundle kept when a stage failed (its path), or why
    none could be written."""

    sandboxes: list[SandboxTeardown] = Field(default_factory=list)
    debug_bundle: str = ""
    debug_bundle_error: str = ""


DETAILS: dict[Stage, type[Details]] = {
    Stage.IMAGE: ImageDetails,
    Stage.SANDBOX: SandboxDetails,
    Stage.PIPELINE_RUNS: PipelineRunsDetails,
    Stage.UI_SMOKE: UiSmokeDetails,
    Stage.TEARDOWN: TeardownDetails,
}
