"""The Kubernetes example (examples/ml-platform-k8s) through the whole lifecycle, as Dagster runs
on a real instance, against an emulated Kubernetes API server.

The API server is tests/support/kube_api.py on loopback, spoken to by the official `kubernetes`
client over real HTTP. It runs no containers: its controller plays the kubelet and the
operators (Deployments become Available, a Job's pod prints what a training run prints, a
RayJob or SparkApplication reaches its terminal state), and the `mlflow` Service's proxy reaches
a stand-in that answers the MLflow REST routes the configs check, knowing only the run that the
Job's log names. What these tests show is the harness's side of the lifecycle: a namespace per
sandbox, the engine's and the config's manifests in order, the Secret, readiness, Jobs and
custom resources followed to their end, outputs parsed from pod logs, UI smoke through the
service proxy, and a teardown the API confirms.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from mlci_dagster.paths import EXAMPLE_REGISTRY
from tests.conftest import run_partition, stage_details
from tests.support.kube_api import KubeApiServer, KubeController

EXAMPLE_K8S = EXAMPLE_REGISTRY.parent / "ml-platform-k8s"
RUN_ID = "0123456789abcdef0123456789abcdef"
TRAIN_LOG = f"accuracy=0.953\nexperiment_id=7\nrun_id={RUN_ID}\n"
PASSWORD = "pg-s3cret-Lk8Q2"
EXPERIMENTS = {"7": "python-train"}


class MlflowStandIn(BaseHTTPRequestHandler):
    """The MLflow routes the example's ui_smoke checks; it knows one run, the Job's."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook)
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            return self.reply(200, "<html><title>MLflow</title></html>", "text/html")
        if url.path.endswith("/experiments/get") and query.get("experiment_id") in EXPERIMENTS:
            return self.reply(200, {"experiment": {"experiment_id": query["experiment_id"],
                                                   "name": EXPERIMENTS[query["experiment_id"]]}})
        if url.path.endswith("/experiments/get-by-name"):
            return self.reply(200, {"experiment": {"name": query.get("experiment_name")}})
        if url.path.endswith("/runs/get") and query.get("run_id") == RUN_ID:
            return self.reply(200, {"run": {"info": {"run_id": RUN_ID, "status": "FINISHED"}}})
        return self.reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})

    def reply(self, status: int, body: object, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[KubeApiServer, KubeController]]:
    """The emulated API server and its controller, $KUBECONFIG pointing at it, and the mlflow
    Service routed to the stand-in in every namespace."""
    mlflow = ThreadingHTTPServer(("127.0.0.1", 0), MlflowStandIn)
    threading.Thread(target=mlflow.serve_forever, daemon=True).start()
    with KubeApiServer() as api, KubeController(api) as controller:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.setenv("MLCI_PG_PASSWORD", PASSWORD)
        api.route_service(None, "mlflow", f"http://127.0.0.1:{mlflow.server_address[1]}")
        controller.behave("Job", "train", log=TRAIN_LOG)
        yield api, controller
        assert controller.errors == []
    mlflow.shutdown()


def example_copy(root: Path, **timeouts: float) -> Path:
    """The example registry, with shorter stage timeouts where a failure must end quickly."""
    shutil.copytree(EXAMPLE_K8S, root)
    for path in (root / "configs").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        config["timeouts"] = config.get("timeouts", {}) | timeouts
        path.write_text(yaml.safe_dump(config))
    return root


def mlci_namespaces(api: KubeApiServer) -> list[str]:
    return [ns["metadata"]["name"] for ns in api.objects("Namespace")
            if ns["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == "mlci"]


@pytest.mark.parametrize("key", ["python-train|sqlite", "python-train|postgres",
                                 "ray-train|sqlite", "spark-features|postgres"])
def test_kubernetes_example_passes_end_to_end(cluster, instance, key):
    api, _ = cluster

    result, record = run_partition(instance, EXAMPLE_K8S, key)

    assert record["status"] == "pass", record["error_summary"]
    assert result.success
    assert {s: v["status"] for s, v in record["stages"].items()} == dict.fromkeys(
        ["image", "sandbox", "pipeline_runs", "ui_smoke", "teardown"], "pass")
    namespace = stage_details(instance, result.run_id, "sandbox")["handle"]["sandbox_id"]
    created = [path.rsplit("/", 1)[-1] for method, path in api.requests
               if method == "POST" and f"/namespaces/{namespace}/" in path]
    # The Secret first, then the engine's PostgreSQL (Deployment, Service), then MLflow's.
    applications = 2 if key.endswith("|postgres") else 1
    assert [c for c in created if c in ("secrets", "deployments", "services")] == [
        "secrets", *["deployments", "services"] * applications]
    routes = stage_details(instance, result.run_id, "ui_smoke")["routes"]
    assert routes and all(r["status"] == 200 and not r["problems"] for r in routes)
    assert all(f"/api/v1/namespaces/{namespace}/services/" in r["url"] for r in routes)
    assert mlci_namespaces(api) == []  # deleted, and gone according to the API


def test_the_job_log_gives_the_outputs_the_ui_smoke_checks(cluster, instance):
    result, record = run_partition(instance, EXAMPLE_K8S, "python-train|sqlite")

    outputs = stage_details(instance, result.run_id, "pipeline_runs")["outputs"]["train"]
    assert outputs == {"run_id": RUN_ID, "experiment_id": "7", "accuracy": "0.953"}
    assert record["metrics"]["accuracy"]["value"] == pytest.approx(0.953)
    checked = [r["url"] for r in stage_details(instance, result.run_id, "ui_smoke")["routes"]]
    assert any(f"run_id={RUN_ID}" in url for url in checked)


def test_the_secret_reaches_the_cluster_but_no_record_log_or_event(cluster, instance,
                                                                   dagster_home):
    api, _ = cluster

    result, _ = run_partition(instance, EXAMPLE_K8S, "python-train|postgres")

    assert result.success
    stored = json.dumps([str(e) for e in instance.all_logs(result.run_id)])
    assert PASSWORD not in stored
    for path in dagster_home.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    secrets = [(method, path) for method, path in api.requests
               if method == "POST" and path.endswith("/secrets")]
    assert len(secrets) == 1


def test_a_crashing_pod_fails_the_sandbox_with_its_events(cluster, instance, tmp_path):
    api, controller = cluster
    controller.behave("Deployment", "mlflow", failure="crash-loop")
    registry = example_copy(tmp_path / "registry", sandbox_s=8)

    result, record = run_partition(instance, registry, "python-train|sqlite")

    assert not result.success
    assert record["status"] == "fail-sandbox"
    assert record["stages"]["sandbox"]["failure_kind"] == "product"
    assert "CrashLoopBackOff" in record["error_summary"]
    assert "Back-off restarting failed container" in record["error_summary"]
    assert record["stages"]["teardown"]["status"] == "pass"
    assert mlci_namespaces(api) == []


def test_a_failed_rayjob_fails_pipeline_runs_with_the_driver_log(cluster, instance):
    api, controller = cluster
    controller.behave("RayJob", "ray-train", failure="fail")

    result, record = run_partition(instance, EXAMPLE_K8S, "ray-train|sqlite")

    assert not result.success
    assert record["status"] == "fail-pipeline_runs"
    assert record["stages"]["pipeline_runs"]["failure_kind"] == "product"
    assert "FAILED" in record["error_summary"]
    assert "Traceback (most recent call last)" in record["error_summary"]
    details = stage_details(instance, result.run_id, "pipeline_runs")
    log = Path(details["pipelines"][0]["log_ref"]).read_text()
    assert "Traceback (most recent call last)" in log
    assert mlci_namespaces(api) == []
