"""Cleanup in layers on the cloud providers, what is left counted through the clouds' own APIs:
a SIGKILLed lifecycle leaves no SageMaker model, endpoint config or endpoint tagged with its run
(boto3 against moto's server, behind the proxy that gives endpoints their Creating and Deleting
time) and no TPU node labelled with its run (google-cloud-tpu against the loopback Cloud TPU
API, pipelines over SSH to a real sshd) once the janitor and the run-failure sensor have run.

CI kills each provider in the stage where the most is in flight (an endpoint being created; a
pipeline running on the node); the other stages are `slow` (benchmarks/failure_injection.py
prints them all)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from mlci_dagster.vocabulary import STAGES, Stage
from tests.support.injection import inject, registry_on
from tests.support.services import SSHD, require

# Per provider: the stage CI kills it in, and what its API lists of a run in the result.
CLOUDS = {"aws-sagemaker": (Stage.SANDBOX, "sagemaker"),
          "gcp-tpu-vm": (Stage.PIPELINE_RUNS, "tpu_nodes")}


@pytest.fixture
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Config `inject` on the provider `request.param`, its cloud emulated on loopback."""
    if request.param == "gcp-tpu-vm":
        require(SSHD)
    with registry_on(request.param, tmp_path) as root:
        yield root


@pytest.mark.parametrize(("registry", "stage"), [
    pytest.param(provider, str(stage), id=f"{provider}-{stage}",
                 marks=[] if stage is ci_stage else [pytest.mark.slow])
    for provider, (ci_stage, _) in CLOUDS.items() for stage in STAGES], indirect=["registry"])
def test_sigkill_leaves_nothing_in_the_cloud_after_the_cleanup_layers(
        registry, stage, request, tmp_path, monkeypatch):
    in_the_cloud = CLOUDS[request.node.callspec.params["registry"]][1]
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))  # inject sets it; restored after

    result = inject(stage, tmp_path / "home", registry)

    assert result["killed_in"] == stage
    if stage != "image":
        assert result["sandboxes"] == 1
        assert result["crash_details"][in_the_cloud]  # the crash left it in the cloud
    assert result["details"][in_the_cloud] == []  # the API lists nothing of the run any more
    assert result["leaks"] == 0, result["details"]
    assert result["run_status"] == dg.DagsterRunStatus.FAILURE  # the janitor ended it
    assert result["results"] == 0  # never recorded, least of all as a pass
