"""The aws-sagemaker provider, through the real boto3 against moto's server on loopback.

What moto emulates and what it cannot (moto 5.2.6, the installed package: `moto/sagemaker/
models.py`, where `FakeEndpoint` is InService when created and `delete_endpoint` removes it at
once; `moto/sagemakerruntime/models.py`, whose `invoke_endpoint` pops the results queued through
`moto/moto_api/_internal/urls.py`'s `/moto-api/static/sagemaker/endpoint-results`):
- models, endpoint configs and endpoints with their tags, `list_*` and `list_tags`, and
  ValidationException ("Could not find ...") once deleted: all real here.
- An endpoint is InService as soon as it is created: the Creating -> InService wait returns
  at once, and an endpoint never goes Failed. The failure path is shown on the pure functions
  and on the provider's wait with a stand-in `describe` (the creates and deletes are moto's).
- `invoke_endpoint` does not run a container: it returns results queued through moto's
  documented `/moto-api/static/sagemaker/endpoint-results` (FIFO), always with status 200; a
  ModelError (the container's own error status) cannot be emulated, so `expect_status` on an
  error is shown on the pure `judge` only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import yaml

from mlci_dagster.providers.aws import SageMakerProvider, diagnose
from mlci_dagster.providers.aws.client import READ_TIMEOUT, SageMakerClient, SageMakerError
from mlci_dagster.providers.aws.provider import AwsSettings
from mlci_dagster.providers.base import Provider, provider_class
from mlci_dagster.providers.handle import SandboxError
from mlci_dagster.providers.janitor import sweep
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.registry.aws import SageMakerInvokePipeline, SageMakerSandbox
from mlci_dagster.vocabulary import FailureKind
from tests.support.aws_proxy import (
    FAKE_CREDENTIALS,
    REAL_CREDENTIALS,
    REGION,
    create_project_and_image,
    moto_server,
)
from tests.support.registries import write_registry
from tests.support.runs import run_partition, stage_details
from tests.support.sagemaker_api import queue_invocation_results

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "aws-sagemaker"
ROLE = "arn:aws:iam::123456789012:role/mlci-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/ml/iris-serve:latest"


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server on loopback for the whole file, its process group killed afterwards."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials through the standard chain (the environment), moto emptied."""
    for name, value in {**FAKE_CREDENTIALS, "MLCI_AWS_ENDPOINT_URL": moto_url,
                        "MLCI_SAGEMAKER_ROLE_ARN": ROLE}.items():
        monkeypatch.setenv(name, value)
    for name in REAL_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    return moto_url


@pytest.fixture
def sagemaker(aws: str) -> Any:
    return boto3.client("sagemaker", endpoint_url=aws, region_name=REGION)


@pytest.fixture
def provider(aws: str, tmp_path: Path) -> SageMakerProvider:
    return SageMakerProvider(tmp_path / "home", root=tmp_path,
                             settings=AwsSettings(REGION, "${env.MLCI_AWS_ENDPOINT_URL}"),
                             poll_interval_s=0.05)


def sandbox(**fields: Any) -> SageMakerSandbox:
    return SageMakerSandbox.model_validate({
        "provider": "aws-sagemaker", "region": REGION,
        "endpoint_url": "${env.MLCI_AWS_ENDPOINT_URL}", "execution_role_arn": ROLE,
        "environment": {"MODEL_NAME": "iris"}, **fields})


def create(provider: SageMakerProvider, spec: SageMakerSandbox | None = None,
           run_id: str = "run-1"):
    return provider.create(spec or sandbox(), config="iris", engine="cpu", run_id=run_id,
                           engine_variables={}, teardown_s=60,
                           image={"ref": IMAGE, "digest": "sha256:1"})


def tags(client: Any, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=arn)["Tags"]}


# --- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(("description", "ready", "failed", "kind"), [
    ({"EndpointStatus": "InService"}, True, False, None),
    ({"EndpointStatus": "Creating"}, False, False, FailureKind.TIMEOUT),
    ({"EndpointStatus": "Failed", "FailureReason": "The primary container for production "
      "variant AllTraffic did not pass the ping health check."}, False, True,
     FailureKind.PRODUCT),
    ({"EndpointStatus": "Failed", "FailureReason": "ResourceLimitExceeded: account-level "
      "service limit 'ml.g5.xlarge for endpoint usage' is 0 Instances"}, False, True,
     FailureKind.INFRA),
    ({"EndpointStatus": "Failed", "FailureReason": "Could not assume role "
      "arn:aws:iam::1:role/x"}, False, True, FailureKind.INFRA),
    (None, False, True, FailureKind.PRODUCT),
])
def test_endpoint_state_and_whose_fault_a_failure_is(description, ready, failed, kind):
    state = diagnose.endpoint_state(description)
    assert (state.ready, state.failed) == (ready, failed)
    if kind is not None:
        assert diagnose.failure_kind(state) is kind
    if description and description.get("FailureReason"):
        assert description["FailureReason"] in state.why


@pytest.mark.parametrize(("status", "text", "expect", "problems", "outputs"), [
    (200, '{"predictions": [{"label": "setosa", "score": 0.98}]}',
     {"contains": ["setosa"], "json_equals": {"predictions.0.label": "setosa"},
      "outputs": {"score": "predictions.0.score"}}, [], {"score": 0.98}),
    (200, '{"predictions": [{"label": "virginica"}]}',
     {"json_equals": {"predictions.0.label": "setosa"}},
     ["predictions.0.label = 'virginica', expected 'setosa'"], {}),
    (200, "not json", {"json_equals": {"a": 1}}, ["response is not JSON: 'not json'"], {}),
    (200, "{}", {"contains": ["setosa"], "outputs": {"score": "score"}},
     ["response lacks 'setosa'", "output 'score': score not in the response"], {}),
    # A ModelError's container status: the error path a config may expect.
    (400, '{"error": "bad input"}', {"expect_status": 400, "json_equals": {"error": "bad input"}},
     [], {}),
    (500, "boom", {}, ["status 500, expected 200"], {}),
])
def test_judge_an_invocation(status, text, expect, problems, outputs):
    found, captured = diagnose.judge(status, text, expect_status=expect.get("expect_status", 200),
                                     contains=expect.get("contains", []),
                                     json_equals=expect.get("json_equals", {}),
                                     outputs=expect.get("outputs", {}))
    assert (found, captured) == (problems, outputs)


def test_resource_names_are_sagemaker_names_that_keep_engine_and_suffix():
    name = diagnose.resource_name("a" * 80, "cpu", "0123abcd")
    assert len(name) <= 63 and name.startswith("mlci-a") and name.endswith("-cpu-0123abcd")


def test_registry_routes_aws_sagemaker_to_this_provider():
    assert provider_class("aws-sagemaker") is SageMakerProvider
    assert SageMakerProvider.settings_of(sandbox()) == AwsSettings(
        REGION, "${env.MLCI_AWS_ENDPOINT_URL}")


# --- against moto --------------------------------------------------------------------------


def test_create_tags_model_config_and_endpoint_and_waits_to_in_service(provider, sagemaker):
    handle = create(provider)
    assert isinstance(provider, Provider)
    ledger = json.loads((provider.home / "ledger" / f"{handle.sandbox_id}.json").read_text())
    assert ledger["state"]["created"] == ["model", "endpoint-config", "endpoint"]

    probes = provider.wait_until_ready(handle, sandbox(), timeout_s=30)

    assert probes[0]["status"] == "InService"
    name = handle.sandbox_id
    model = sagemaker.describe_model(ModelName=name)
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["Environment"] == {"MODEL_NAME": "iris"}
    config = sagemaker.describe_endpoint_config(EndpointConfigName=name)
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"
    endpoint = sagemaker.describe_endpoint(EndpointName=name)
    assert endpoint["EndpointArn"] == handle.state["endpoint_arn"]
    for arn in (model["ModelArn"], config["EndpointConfigArn"], endpoint["EndpointArn"]):
        found = tags(sagemaker, arn)
        assert found["mlci:run-id"] == "run-1" and found["mlci:partition"] == "iris.cpu"
        assert found["mlci:expires-at"] == str(int(handle.expires_at))
    assert handle.endpoints["endpoint"] == f"{provider.settings.resolve().endpoint_url}" \
        f"/endpoints/{name}/invocations"
    assert handle.variables["MLCI_SAGEMAKER_ENDPOINT"] == name
    assert provider.destroy(handle, timeout_s=60).clean


def test_invoke_passes_on_its_assertions_and_records_latency(provider, aws):
    handle = create(provider)
    queue_invocation_results(aws, {"predictions": [{"label": "setosa", "score": 0.98}]},
                             {"predictions": [{"label": "virginica", "score": 0.7}]})
    passing = SageMakerInvokePipeline(
        kind="sagemaker_invoke", name="predict", payload={"instances": [[5.1, 3.5, 1.4, 0.2]]},
        contains=["setosa"], json_equals={"predictions.0.label": "setosa"},
        outputs={"score": "predictions.0.score"})
    failing = passing.model_copy(update={"name": "predict-2", "payload": {"instances": [[7]]}})

    ok = provider.run_pipeline(handle, passing, {}, timeout_s=20)
    bad = provider.run_pipeline(handle, failing, {}, timeout_s=20)

    assert ok.passed, ok.summary
    assert ok.outputs["score"] == 0.98 and ok.outputs["latency_ms"] > 0
    assert "InvokeEndpoint" in Path(ok.log_ref).read_text()
    assert not bad.passed and bad.failure_kind is FailureKind.PRODUCT
    assert "predictions.0.label = 'virginica', expected 'setosa'" in bad.summary
    assert provider.destroy(handle, timeout_s=60).clean


def test_invoke_sends_a_payload_file_and_a_missing_file_is_the_tests_own_fault(
        provider, aws, tmp_path):
    handle = create(provider)
    (tmp_path / "batch.json").write_text('{"instances": [[1], [2]]}')
    queue_invocation_results(aws, {"count": 2})
    from_file = SageMakerInvokePipeline(kind="sagemaker_invoke", name="batch",
                                        payload_file="batch.json", json_equals={"count": 2})
    missing = from_file.model_copy(update={"payload_file": "nope.json"})

    assert provider.run_pipeline(handle, from_file, {}, timeout_s=20).passed
    result = provider.run_pipeline(handle, missing, {}, timeout_s=20)

    assert result.failure_kind is FailureKind.CONFIG and "nope.json" in result.summary
    assert provider.destroy(handle, timeout_s=60).clean


def test_destroy_deletes_and_verifies_each_resource_and_is_idempotent(provider, sagemaker):
    handle = create(provider)

    report = provider.destroy(handle, timeout_s=60)
    again = provider.destroy(handle, timeout_s=60)

    assert report.clean, report.why
    assert report.remote["resources"] == {"endpoint": "gone", "endpoint-config": "gone",
                                   "model": "gone"}
    assert again.clean
    for call, key in ((sagemaker.describe_endpoint, "EndpointName"),
                      (sagemaker.describe_endpoint_config, "EndpointConfigName"),
                      (sagemaker.describe_model, "ModelName")):
        with pytest.raises(sagemaker.exceptions.ClientError, match="Could not find"):
            call(**{key: handle.sandbox_id})
    assert not (provider.home / "ledger" / f"{handle.sandbox_id}.json").exists()


def test_list_live_finds_sandboxes_from_their_tags_when_the_ledger_is_wiped(provider):
    handle = create(provider, run_id="run-lost")
    shutil.rmtree(provider.home / "ledger")
    fresh = SageMakerProvider(provider.home, settings=provider.settings, poll_interval_s=0.05)

    live = {h.sandbox_id: h for h in fresh.list_live()}

    found = live[handle.sandbox_id]
    assert (found.run_id, found.config, found.engine) == ("run-lost", "iris", "cpu")
    assert found.expires_at == int(handle.expires_at)
    verdicts = sweep([fresh], run_over=lambda run: run == "run-lost",
                     teardown_timeout=lambda _: 60)
    assert verdicts[0].report.clean
    assert fresh.list_live() == []


def test_the_janitor_reaps_an_orphaned_model_created_without_an_endpoint(provider, sagemaker):
    """A model whose create timed out on the client but went through: tagged, no ledger entry,
    no endpoint config, no endpoint."""
    name = diagnose.resource_name("iris", "cpu", "deadbeef")
    sagemaker.create_model(
        ModelName=name, ExecutionRoleArn=ROLE, PrimaryContainer={"Image": IMAGE},
        Tags=[{"Key": "mlci:run-id", "Value": "run-crashed"},
              {"Key": "mlci:partition", "Value": "iris.cpu"},
              {"Key": "mlci:expires-at", "Value": str(int(time.time()) + 3600)}])
    sagemaker.create_model(ModelName="mlci-not-ours", ExecutionRoleArn=ROLE,
                           PrimaryContainer={"Image": IMAGE})

    verdicts = sweep([provider], run_over=lambda run: run == "run-crashed",
                     teardown_timeout=lambda _: 60)

    assert [(v.sandbox_id, v.report.clean) for v in verdicts] == [(name, True)]
    assert verdicts[0].report.remote["resources"]["model"] == "gone"
    assert [m["ModelName"] for m in sagemaker.list_models()["Models"]] == ["mlci-not-ours"]


def test_a_create_that_times_out_but_went_through_is_deleted_at_once(provider, sagemaker,
                                                                      monkeypatch):
    """moto answers every call: the timeout is made on this side, after the real call."""
    real = SageMakerClient.create_endpoint_config

    def times_out(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise SageMakerError("CreateEndpointConfig: ReadTimeoutError: Read timeout on "
                             "endpoint URL", "CreateEndpointConfig", READ_TIMEOUT)

    monkeypatch.setattr(SageMakerClient, "create_endpoint_config", times_out)

    with pytest.raises(SandboxError, match="CreateEndpointConfig: ReadTimeoutError") as raised:
        create(provider)

    assert raised.value.kind == "infra"
    assert sagemaker.list_models()["Models"] == []
    assert sagemaker.list_endpoint_configs()["EndpointConfigs"] == []
    assert provider.list_live() == []


def test_a_failed_endpoint_fails_the_wait_with_its_reason(provider, tmp_path):
    """moto's endpoints are InService at once and never fail: the provider's wait is shown
    here against a stand-in describe that answers Creating, then Failed with a reason."""
    answers = iter([{"EndpointStatus": "Creating"},
                    {"EndpointStatus": "Failed", "FailureReason": "The primary container "
                     "for production variant AllTraffic did not pass the ping health check."}])

    class StandIn(SageMakerClient):
        def describe(self, kind, name):
            return next(answers)

    access = provider.settings.resolve()
    provider._clients[access] = StandIn(access)
    handle = create(provider)  # the creates are moto's

    with pytest.raises(SandboxError, match="did not pass the ping health check") as raised:
        provider.wait_until_ready(handle, sandbox(), timeout_s=10)

    assert raised.value.kind == "product"
    assert "EndpointStatus Failed" in Path(raised.value.log_ref).read_text()
    provider._clients.clear()
    assert provider.destroy(handle, timeout_s=60).clean


# --- registry ------------------------------------------------------------------------------


def sagemaker_config(**sandbox_fields: Any) -> dict[str, Any]:
    return {"name": "bad", "owners": {"default": "t"}, "image": {"ref": IMAGE},
            "sandbox": {"provider": "aws-sagemaker", "execution_role_arn": ROLE,
                        **sandbox_fields},
            "pipelines": [{"kind": "sagemaker_invoke", "name": "p", "payload": {"a": 1}}]}


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c["sandbox"].update(instance_typ="ml.m5.large"),
     "sandbox.instance_typ: unknown key 'instance_typ' (did you mean 'instance_type'?)"),
    (lambda c: c["sandbox"].update(region="mars"),
     "sandbox.region: expected an AWS region such as us-east-1"),
    (lambda c: c["sandbox"].update(execution_role_arn="admin"),
     "sandbox.execution_role_arn: expected an IAM role ARN"),
    (lambda c: c["sandbox"].update(instance_count=0),
     "sandbox.instance_count: Input should be greater than or equal to 1"),
    (lambda c: c["pipelines"][0].update(payload_file="x.json"),
     "pipelines[0]: expected exactly one of 'payload' or 'payload_file'"),
    (lambda c: c["pipelines"][0].update(payload=None, payload_file="batch/x.json"),
     "pipelines[0].payload_file: file 'batch/x.json' not found under the registry root"),
    (lambda c: c.update(sandbox={"services": []}),
     "pipelines[0].kind: 'sagemaker_invoke' runs only in a 'aws-sagemaker' sandbox"),
    (lambda c: c["pipelines"][0].update(json_equal={"a": 1}),
     "pipelines[0].json_equal: unknown key 'json_equal' (did you mean 'json_equals'?)"),
])
def test_registry_errors_name_the_file_and_field(tmp_path, change, expected):
    body = sagemaker_config()
    change(body)
    root = write_registry(tmp_path, [body])

    with pytest.raises(RegistryError) as raised:
        load_registry(root)

    path = root / "configs" / "bad.yaml"
    assert any(p.startswith(f"{path}: ") and expected in p for p in raised.value.problems), \
        raised.value.problems


# --- the example, whole, through Dagster ----------------------------------------------------


def test_the_example_passes_end_to_end_through_dagster_against_moto(aws, instance, sagemaker,
                                                                    dagster_home):
    digest = create_project_and_image(aws, "iris-serve-image", IMAGE, REGION)
    queue_invocation_results(aws, {"predictions": [{"label": "setosa", "score": 0.97}]},
                             {"count": 3})

    result, record = run_partition(instance, EXAMPLE, "iris-classifier|cpu")

    assert result.success
    assert record["status"] == "pass", record
    assert record["image_digest"] == digest  # what ECR gives the tag the CodeBuild build pushed
    assert record["metrics"]["score"]["value"] == 0.97
    assert set(record["pipelines"]) == {"predict-one", "predict-batch"}
    assert stage_details(instance, result.run_id, "pipeline_runs")["outputs"][
        "predict-one"]["latency_ms"] > 0
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert sagemaker.list_endpoint_configs()["EndpointConfigs"] == []
    assert sagemaker.list_models()["Models"] == []
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


def test_example_readme_names_the_moto_command():
    readme = (EXAMPLE / "README.md").read_text()
    assert "moto.server" in readme and "MLCI_AWS_ENDPOINT_URL" in readme
    assert yaml.safe_load((EXAMPLE / "mlci.yaml").read_text())["engines"]
    assert os.path.exists(EXAMPLE / "payloads" / "batch.json")
