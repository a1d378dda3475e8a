"""Image-build sensors and registry clients, against real servers on loopback.

- OCI: Debian's `docker-registry` (the CNCF distribution registry); images are pushed over
  its HTTP API (blob uploads, then the manifest), no docker client.
- ECR: moto in server mode (the ECR JSON protocol over HTTP; no AWS account is reachable).
- Push from CI: a real `dagster-webserver` receives `POST /report_asset_materialization/...`
  through the `curl` one-liner the README documents.
- Restarts: the real `dagster-daemon run`, stopped and started again on the same DAGSTER_HOME.

Every process a test starts runs in its own process group, killed whole when the test ends,
pass or fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest
import requests
import yaml

from mlci_dagster.definitions import build_definitions
from mlci_dagster.images import EcrRegistry, ImageRegistryError, OciRegistry
from mlci_dagster.providers.ports import allocate_free_port
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.vocabulary import FailureKind, Status
from tests.support.dagster_services import VENV_BIN, daemon, service_env, wait_until
from tests.support.loopback import OCI_MANIFEST, REGISTRY_BIN, background, push_image, sha256
from tests.support.registries import PY, config, write_registry
from tests.support.runs import QUIET, stage_details

ECR_HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
# The one-liner of the README, for a GitHub Actions step after `docker push`.
CURL_REPORT = (
    'curl -fsS -X POST -H "Content-Type: application/json" '
    '"$DAGSTER_URL/report_asset_materialization/pushed_image" '
    '-d "{\\"metadata\\":{\\"image_ref\\":\\"$IMAGE\\",\\"image_digest\\":\\"$DIGEST\\"}}"'
)


# --- an OCI registry ---------------------------------------------------------------------


@pytest.fixture
def oci_registry(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real distribution registry on loopback: yields (base URL, host:port)."""
    if not REGISTRY_BIN.exists():
        pytest.fail(f"{REGISTRY_BIN} is missing: run scripts/install-test-services.sh (as root)")
    port = allocate_free_port()
    host = f"127.0.0.1:{port}"
    settings = tmp_path / "oci-registry.yml"
    settings.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "oci-storage")}},
        "http": {"addr": host},
    }))
    log = tmp_path / "oci-registry.log"
    with background([str(REGISTRY_BIN), "serve", str(settings)], log):
        base = f"http://{host}"
        wait_until(lambda: requests.get(f"{base}/v2/", timeout=1).status_code == 200, 20,
                   "docker-registry to answer /v2/", log)
        yield base, host



# --- an ECR API ----------------------------------------------------------------------------


@pytest.fixture
def ecr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """moto's server on loopback: yields (a boto3 ECR client, its endpoint URL)."""
    port = allocate_free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "moto.log"
    with background([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log):
        wait_until(lambda: requests.get(url, timeout=1), 30, "moto to answer", log)
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("ecr", endpoint_url=url, region_name="us-east-1")
        client.create_repository(repositoryName="ml/platform")
        yield client, url


def put_ecr_image(client: Any, tag: str, layer_digest: str) -> str:
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"digest": sha256(b"config"), "size": 6},
                "layers": [{"digest": layer_digest, "size": 1}]}
    image = client.put_image(repositoryName="ml/platform", imageTag=tag,
                             imageManifest=json.dumps(manifest))["image"]
    return image["imageId"]["imageDigest"]


# --- registries of trivial configs ---------------------------------------------------------


def trivial(name: str, ref: str, **overrides: Any) -> dict[str, Any]:
    """A config that only records its image: no services, a `true` pipeline, no routes."""
    return config(name, image={"ref": ref}, sandbox={"services": []}, ui_smoke={"routes": []},
                  pipelines=[{"kind": "command", "name": "noop", "command": ["true"]}],
                  **overrides)


def image_registry(root: Path, ref: str, other_ref: str, **settings: Any) -> Path:
    """Configs a (e1, e2) and b (e1 only) test `ref`; c tests `other_ref`."""
    write_registry(root, [trivial("a", ref), trivial("b", ref, engines=["e1"]),
                          trivial("c", other_ref)], engines={"e1": {}, "e2": {}})
    body = yaml.safe_load((root / "mlci.yaml").read_text())
    (root / "mlci.yaml").write_text(yaml.safe_dump({**body, **settings}))
    return root


AFFECTED = ["a|e1", "a|e2", "b|e1"]


def evaluate(registry: Path, instance: dg.DagsterInstance, sensor: str, cursor: str | None = None):
    definitions = build_definitions(registry)
    # The daemon resolves partition keys against the instance; in process we say so.
    with dg.partition_loading_context(dynamic_partitions_store=instance), \
            dg.build_sensor_context(instance=instance, resources=definitions.resources,
                                    cursor=cursor, repository_def=definitions.get_repository_def()
                                    ) as context:
        return definitions.resolve_sensor_def(sensor).evaluate_tick(context)


def sensor_runs(instance: dg.DagsterInstance, sensor: str) -> list[dg.DagsterRun]:
    """Runs this sensor started (other sensors, e.g. a stale scanner, may start their own)."""
    return instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": sensor}))


def finished_runs(instance: dg.DagsterInstance, sensor: str, count: int
                  ) -> list[dg.DagsterRun] | None:
    runs = sensor_runs(instance, sensor)
    return runs if len(runs) >= count and all(r.is_finished for r in runs) else None


def sensor_tick_after(instance: dg.DagsterInstance, name: str, after: float) -> bool:
    """Whether a tick of sensor `name` that started after `after` completed without error."""
    for state in instance.all_instigator_state():
        if state.instigator_name == name:
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=5)
            return any(t.timestamp > after and t.status.value in ("SUCCESS", "SKIPPED")
                       for t in ticks)
    return False


def by_partition(runs: list[dg.DagsterRun]) -> list[str]:
    return sorted(r.tags["dagster/partition"] for r in runs)


# --- the clients -------------------------------------------------------------------------


def test_oci_registry_lists_tags_and_resolves_each_tag_to_its_manifest_digest(oci_registry):
    base, host = oci_registry
    nightly = push_image(base, "ml/platform", "nightly", b"layer-1")
    stable = push_image(base, "ml/platform", "stable", b"layer-2")
    client = OciRegistry(host, insecure=True)

    assert sorted(client.tags("ml/platform")) == ["nightly", "stable"]
    assert client.digest("ml/platform", "nightly") == nightly
    assert client.digest("ml/platform", "stable") == stable != nightly


def test_oci_registry_error_names_registry_image_and_http_status_never_the_token(oci_registry):
    base, host = oci_registry
    push_image(base, "ml/platform", "nightly", b"layer-1")
    client = OciRegistry(host, insecure=True, token="tok-5ecret-value")

    with pytest.raises(ImageRegistryError) as missing:
        client.digest("ml/platform", "no-such-tag")
    with pytest.raises(ImageRegistryError) as unreachable:
        OciRegistry(f"127.0.0.1:{allocate_free_port()}", insecure=True).digest("ml/x", "t")

    assert f"oci registry {host}: ml/platform:no-such-tag: HEAD " in str(missing.value)
    assert "HTTP 404" in str(missing.value)
    assert "tok-5ecret-value" not in str(missing.value)
    assert "ml/x:t" in str(unreachable.value) and "unreachable" in str(unreachable.value)


def test_ecr_registry_resolves_tag_digest_and_lists_tags_through_boto3(ecr):
    client, url = ecr
    digest = put_ecr_image(client, "nightly", sha256(b"layer-1"))
    registry = EcrRegistry(ECR_HOST, endpoint_url=url)

    assert registry.region == "us-east-1"
    assert registry.digest("ml/platform", "nightly") == digest
    assert registry.tags("ml/platform") == ["nightly"]
    with pytest.raises(ImageRegistryError, match=rf"ecr registry {ECR_HOST} \(us-east-1\): "
                                                 r"ml/platform:gone: ImageNotFoundException"):
        registry.digest("ml/platform", "gone")


# --- settings --------------------------------------------------------------------------------


def test_image_registry_settings_reject_unknown_keys_and_fields_of_the_other_kind(tmp_path):
    root = image_registry(tmp_path / "reg", "h.test/ml/p:1", "h.test/ml/q:1", image_registries={
        "127.0.0.1:5000": {"kind": "oci", "insecure": True, "colour": "blue"},
        ECR_HOST: {"kind": "ecr", "insecure": True},
    })

    with pytest.raises(RegistryError) as error:
        load_registry(root)

    problems = "\n".join(error.value.problems)
    assert "image_registries.127.0.0.1:5000.colour: unknown key" in problems
    assert f"image_registries.{ECR_HOST}: insecure: not a field of a 'ecr' registry" in problems


def test_image_registry_token_variable_must_be_a_declared_secret(tmp_path):
    root = image_registry(tmp_path / "reg", "h.test/ml/p:1", "h.test/ml/q:1", image_registries={
        "ghcr.io": {"kind": "oci", "token_env": "GHCR_TOKEN"}})

    with pytest.raises(RegistryError, match="image_registries.ghcr.io.token_env: 'GHCR_TOKEN' "
                                            "is not listed under secrets"):
        load_registry(root)


# --- the image stage -------------------------------------------------------------------------


def image_outcome(registry: Path, dagster_home: Path):
    ctx = LifecycleContext.create(load_registry(registry), "a", "e1", "run-1",
                                  dagster_home / "mlci")
    return build_image(ctx)


def test_image_stage_resolves_a_declared_registry_tag_to_its_current_digest(
        oci_registry, tmp_path, dagster_home):
    base, host = oci_registry
    digest = push_image(base, "ml/platform", "nightly", b"layer-1")
    registry = image_registry(tmp_path / "reg", f"{host}/ml/platform:nightly", "h.test/x:1",
                              image_registries={host: {"kind": "oci", "insecure": True}})

    outcome = image_outcome(registry, dagster_home)

    assert outcome.status is Status.PASS
    assert outcome.details.digest == digest


def test_image_stage_fails_as_infra_naming_the_registry_when_it_is_unreachable(
        tmp_path, dagster_home):
    host = f"127.0.0.1:{allocate_free_port()}"  # nothing listens there
    registry = image_registry(tmp_path / "reg", f"{host}/ml/platform:nightly", "h.test/x:1",
                              image_registries={host: {"kind": "oci", "insecure": True}})

    outcome = image_outcome(registry, dagster_home)

    assert (outcome.status, outcome.failure_kind) == (Status.FAIL, FailureKind.INFRA)
    assert f"oci registry {host}: ml/platform:nightly" in outcome.error_summary
    assert "unreachable" in outcome.error_summary


def test_image_stage_tests_the_digest_of_the_run_tag_even_after_the_tag_moved(
        oci_registry, tmp_path, instance):
    base, host = oci_registry
    ref = f"{host}/ml/platform:nightly"
    tested = push_image(base, "ml/platform", "nightly", b"layer-1")
    push_image(base, "ml/platform", "nightly", b"layer-2")  # the tag moves on
    registry = image_registry(tmp_path / "reg", ref, "h.test/x:1",
                              image_registries={host: {"kind": "oci", "insecure": True}})
    instance.add_dynamic_partitions("config", ["a"])
    job = build_definitions(registry).resolve_job_def("lifecycle")

    result = job.execute_in_process(
        partition_key="a|e1", instance=instance, run_config=QUIET, raise_on_error=False,
        tags={"mlci/image_digest": tested, "mlci/image_ref": ref})

    assert result.success
    assert stage_details(instance, result.run_id, "image")["digest"] == tested


# --- the sensors -----------------------------------------------------------------------------


def test_definitions_register_both_image_sensors_on_the_lifecycle_job_and_the_pushed_asset(
        tmp_path):
    registry = image_registry(tmp_path / "reg", "h.test/ml/p:1", "h.test/ml/q:1",
                              image_poll_interval_s=7)
    repo = build_definitions(registry).get_repository_def()

    poll, push = repo.get_sensor_def("image_poll"), repo.get_sensor_def("image_push")
    assert poll.minimum_interval_seconds == 7
    assert poll.job_name == push.job_name == "lifecycle"
    assert repo.asset_graph.get(dg.AssetKey("pushed_image")).is_external


def test_image_sensors_skip_with_a_reason_when_nothing_is_declared_or_pushed(tmp_path, instance):
    registry = image_registry(tmp_path / "reg", "h.test/ml/p:1", "h.test/ml/q:1")

    poll = evaluate(registry, instance, "image_poll")
    push = evaluate(registry, instance, "image_push")

    assert poll.run_requests == [] and "no image_registries" in poll.skip_message
    assert push.run_requests == [] and "no new pushed_image report" in push.skip_message


def test_ecr_digest_change_requests_one_run_per_partition_using_the_image(ecr, tmp_path,
                                                                          instance):
    """The poll sensor evaluated in process, its cursor carried from tick to tick."""
    client, url = ecr
    ref = f"{ECR_HOST}/ml/platform:nightly"
    first = put_ecr_image(client, "nightly", sha256(b"layer-1"))
    registry = image_registry(tmp_path / "reg", ref, f"{ECR_HOST}/ml/platform:other",
                              image_registries={ECR_HOST: {"kind": "ecr", "endpoint_url": url}})
    instance.add_dynamic_partitions("config", ["a", "b", "c"])

    tick1 = evaluate(registry, instance, "image_poll")
    tick2 = evaluate(registry, instance, "image_poll", cursor=tick1.cursor)
    second = put_ecr_image(client, "nightly", sha256(b"layer-2"))
    tick3 = evaluate(registry, instance, "image_poll", cursor=tick2.cursor)

    # A fresh home: the digests as they are, nothing run (no surprise in a new UI).
    assert tick1.run_requests == [] and tick1.skip_message.startswith("first poll")
    assert json.loads(tick1.cursor) == {"digests": {ref: first}}
    assert tick2.run_requests == []  # unchanged digest; `other` missing is a warning only
    assert sorted(r.partition_key for r in tick3.run_requests) == AFFECTED
    assert {r.run_key for r in tick3.run_requests} == {f"image:{second}:{p}" for p in AFFECTED}
    assert {r.tags["mlci/image_digest"] for r in tick3.run_requests} == {second}
    assert {r.tags["mlci/trigger"] for r in tick3.run_requests} == {"sensor"}
    assert json.loads(tick3.cursor) == {"digests": {ref: second}}


@pytest.mark.daemon
@pytest.mark.slow  # the restart path is in CI through the CI-push test below
def test_polled_new_digest_runs_each_partition_once_even_across_a_daemon_restart(
        oci_registry, tmp_path, dagster_home, instance):
    """The real `dagster-daemon run`: it ticks the poll sensor and launches the runs; it is
    then stopped and a new daemon process started on the same DAGSTER_HOME."""
    base, host = oci_registry
    ref = f"{host}/ml/platform:nightly"
    registry = image_registry(tmp_path / "reg", ref, f"{host}/ml/other:nightly",
                              image_registries={host: {"kind": "oci", "insecure": True}},
                              image_poll_interval_s=1)
    instance.add_dynamic_partitions("config", ["a", "b", "c"])
    push_image(base, "ml/platform", "nightly", b"layer-0")  # there before: recorded, not run

    log1 = tmp_path / "daemon-1.log"
    with daemon(dagster_home, registry, log1):
        wait_until(lambda: sensor_tick_after(instance, "image_poll", 0), 120,
                   "the first image_poll tick", log1)
        digest = push_image(base, "ml/platform", "nightly", b"layer-1")
        runs = wait_until(lambda: finished_runs(instance, "image_poll", 3), 180,
                          "3 finished runs", log1)
    restarted_at = time.time()
    log2 = tmp_path / "daemon-2.log"
    with daemon(dagster_home, registry, log2):
        wait_until(lambda: sensor_tick_after(instance, "image_poll", restarted_at), 120,
                   "an image_poll tick after the restart", log2)
        after_restart = sensor_runs(instance, "image_poll")

    assert by_partition(runs) == AFFECTED
    assert {r.tags["mlci/image_digest"] for r in runs} == {digest}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert stage_details(instance, runs[0].run_id, "image")["digest"] == digest
    assert sorted(r.run_id for r in after_restart) == sorted(r.run_id for r in runs)


@pytest.mark.daemon
def test_ci_push_reported_to_the_webserver_runs_each_partition_once_across_a_daemon_restart(
        tmp_path, dagster_home, instance):
    """A real `dagster-webserver` receives the README's curl one-liner; the real
    `dagster-daemon run` ticks the push sensor, is stopped, and a new daemon process on the same
    DAGSTER_HOME ticks again after CI reported the same push a second time."""
    ref = "registry.example.test/ml/platform:main"
    digest = sha256(b"a pushed manifest")
    registry = image_registry(tmp_path / "reg", ref, "registry.example.test/ml/other:main")
    instance.add_dynamic_partitions("config", ["a", "b", "c"])
    port = allocate_free_port()
    web_log = tmp_path / "webserver.log"
    webserver = [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                 "-m", "mlci_dagster.definitions"]
    curl_env = {**os.environ, "DAGSTER_URL": f"http://127.0.0.1:{port}", "IMAGE": ref,
                "DIGEST": digest}

    def report_push() -> None:
        subprocess.run(["bash", "-c", CURL_REPORT], env=curl_env, check=True, timeout=30,
                       capture_output=True)

    with background(webserver, web_log, service_env(dagster_home, registry)):
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/server_info",
                                        timeout=2).ok, 120, "the webserver", web_log)
        report_push()
        log1 = tmp_path / "daemon-1.log"
        with daemon(dagster_home, registry, log1):
            runs = wait_until(lambda: finished_runs(instance, "image_push", 3), 180,
                              "3 finished runs", log1)
        report_push()  # a retried CI job reports the same digest again
        restarted_at = time.time()
        log2 = tmp_path / "daemon-2.log"
        with daemon(dagster_home, registry, log2):
            wait_until(lambda: sensor_tick_after(instance, "image_push", restarted_at), 120,
                       "an image_push tick after the restart", log2)
            after_restart = sensor_runs(instance, "image_push")

    reports = instance.fetch_materializations(dg.AssetKey("pushed_image"), limit=10).records
    assert len(reports) == 2
    assert by_partition(runs) == AFFECTED
    assert {r.tags["mlci/image_ref"] for r in runs} == {ref}
    assert {r.tags["dagster/run_key"] for r in runs} == {f"image:{digest}:{p}" for p in AFFECTED}
    assert stage_details(instance, runs[0].run_id, "image")["digest"] == digest
    assert sorted(r.run_id for r in after_restart) == sorted(r.run_id for r in runs)
