"""The typed hand-offs between stages: each stage's details, and what a destroy verified."""

import json

import pytest
from pydantic import ValidationError

from mlci_dagster.common.redact import Redactor
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import DestroyReport, SandboxHandle
from mlci_dagster.stages.details import (
    ImageDetails,
    PipelineRunsDetails,
    RouteResult,
    SandboxDetails,
    SandboxTeardown,
    TeardownDetails,
    UiSmokeDetails,
)
from mlci_dagster.stages.outcome import StageClock, StageOutcome, skipped
from mlci_dagster.vocabulary import FailureKind, Stage, Status

HANDLE = SandboxHandle("s-1", "local", "c", "e1", "run-1", 1.0, 2.0, "/w", "/l",
                       endpoints={"web": "http://127.0.0.1:1"})


@pytest.mark.parametrize("outcome", [
    StageOutcome(Stage.IMAGE, Status.PASS, 1.0, 0.5,
                 details=ImageDetails(digest="sha256:ab", path="/i", built_at=3.0)),
    StageOutcome(Stage.SANDBOX, Status.PASS, 1.0, 0.5,
                 details=SandboxDetails(handle=HANDLE, probes=[{"service": "web"}])),
    StageOutcome(Stage.PIPELINE_RUNS, Status.FAIL, 1.0, 0.5, FailureKind.PRODUCT, "x",
                 details=PipelineRunsDetails(
                     pipelines=[PipelineResult("train", "command", False, 0.2,
                                               FailureKind.PRODUCT, "exit 1",
                                               details={"exit_code": 1})],
                     outputs={"train": {"loss": 0.5}})),
    StageOutcome(Stage.UI_SMOKE, Status.PASS, 1.0, 0.5, details=UiSmokeDetails(
        routes=[RouteResult("http://x/", status=200, latency_ms=1.5)])),
    StageOutcome(Stage.TEARDOWN, Status.FAIL, 1.0, 0.5, FailureKind.INFRA, "left", details=(
        TeardownDetails(sandboxes=[SandboxTeardown(
            sandbox_id="s-1", artifacts=["/l/web.log"],
            report=DestroyReport(False, "namespace stuck", remote={"namespace_gone": False}))],
            debug_bundle="/b.tar.gz"))),
], ids=str)
def test_an_outcome_read_back_from_its_stored_json_is_the_outcome_it_was(outcome):
    stored = json.loads(json.dumps(outcome.to_dict()))

    assert StageOutcome.from_dict(stored) == outcome


def test_a_stored_outcome_whose_details_do_not_fit_its_stage_is_refused_naming_the_field():
    stored = StageOutcome(Stage.SANDBOX, Status.PASS, 1.0, 0.5,
                          details=SandboxDetails(handle=HANDLE)).to_dict()
    stored["details"]["handle"]["ports"] = {"web": "not a port"}
    with pytest.raises(ValidationError, match=r"handle\.ports\.web"):
        StageOutcome.from_dict(stored)

    stored = StageOutcome(Stage.IMAGE, Status.PASS, 1.0, 0.5).to_dict()
    stored["details"]["digset"] = "sha256:ab"  # a misspelt key is not dropped in silence
    with pytest.raises(ValidationError, match="digset"):
        StageOutcome.from_dict(stored)


def test_a_stage_that_did_not_run_has_its_own_empty_details():
    outcome = skipped(Stage.PIPELINE_RUNS, "sandbox did not pass")

    assert outcome.details == PipelineRunsDetails()
    assert outcome.details.outputs == {} and outcome.details.pipelines == []


def test_the_details_an_outcome_keeps_are_redacted_and_still_typed(monkeypatch):
    monkeypatch.setenv("API_TOKEN", "s3cr3t-value")
    clock = StageClock(Stage.PIPELINE_RUNS, Redactor.from_env(["API_TOKEN"]))
    details = PipelineRunsDetails(
        pipelines=[PipelineResult("train", "command", True, 0.1, summary="",
                                  details={"argv": ["--token", "s3cr3t-value"]})],
        outputs={"train": {"echo": "token=s3cr3t-value"}})

    outcome = clock.passed(details)

    assert "s3cr3t-value" not in json.dumps(outcome.to_dict())
    assert isinstance(outcome.details.pipelines[0], PipelineResult)
    assert details.outputs["train"]["echo"] == "token=s3cr3t-value"  # the caller's is untouched


def test_the_image_attributes_a_template_reaches_are_those_of_the_way_it_was_given():
    pulled = ImageDetails(digest="sha256:ab", ref="example.test/app:1", cached=True)
    built = ImageDetails(digest="sha256:cd", path="/images/cd", built_at=3.0)
    failed = ImageDetails(build_id="p:1", build_status="FAILED")

    assert set(pulled.attributes()) == {"cached", "digest", "path", "ref"}
    assert set(built.attributes()) == {"built_at", "cached", "digest", "path", "ref"}
    assert "build_status" not in failed.attributes()
