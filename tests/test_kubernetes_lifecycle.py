"""The Kubernetes example (examples/ml-platform-k8s) through the whole lifecycle, as Dagster runs
on a real instance, against an emulated Kubernetes API server, as the run pods' service account.

The API server is tests/support/kube_wire.py on loopback, spoken to by the official `kubernetes`
client over real HTTP, with authentication and RBAC on: an admin applies deploy/rbac.yaml (and
makes the namespace and service account the chart would), and the lifecycle runs with a token of
`system:serviceaccount:mlci:mlci-run`, the account deploy/dagster.yaml gives the run pods, and
nothing else (not the chart's own Role). It runs no containers: its controller plays the kubelet
and the operators (Deployments become Available, a Job's pod prints what a training run prints,
a RayJob or SparkApplication reaches its terminal state), and the `mlflow` Service's proxy
reaches a stand-in MLflow per namespace that holds what that namespace's pipelines logged. What
these tests show is the harness's side of the lifecycle: a namespace per sandbox, the engine's
and the config's manifests in order (the spark-features Role and RoleBinding included, under the
API server's escalation checks), the Secret, readiness, Jobs and custom resources followed to
their end, outputs parsed from pod logs, UI smoke through the service proxy with the account's
token, and a teardown the API confirms.
"""

from __future__ import annotations

import copy
import json
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import kubernetes
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import utils as k8s_utils

from mlci_dagster.junit.read import read_report
from mlci_dagster.paths import EXAMPLE_REGISTRY
from tests.support.kube_controller import KubeController
from tests.support.kube_store import TYPES, condition_is
from tests.support.kube_wire import KubeApiServer
from tests.support.runs import run_partition, stage_details

EXAMPLE_K8S = EXAMPLE_REGISTRY.parent / "ml-platform-k8s"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LAUNCHER = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["run_launcher"]["config"]
RUN_NAMESPACE, RUN_ACCOUNT = LAUNCHER["job_namespace"], LAUNCHER["service_account_name"]
RUN_USER = f"system:serviceaccount:{RUN_NAMESPACE}:{RUN_ACCOUNT}"
RUN_ID = "0123456789abcdef0123456789abcdef"
TRAIN_LOG = f"accuracy=0.953\nexperiment_id=7\nrun_id={RUN_ID}\n"
# Where the model-tests Job's pytest writes its JUnit XML (k8s/model-tests-job.yaml), and what
# it writes there for some of examples/ml-platform's model tests; the provider's sidecar hands
# it over through the API server.
MODEL_TESTS = "/reports/model-tests.xml"
SCORED = "test_the_loaded_model_scores_the_logged_accuracy_and_f1"


def model_tests_report(failure: str | None = None) -> str:
    verdict = f'<failure message="{failure}">assert 0.81 &gt;= 0.9</failure>' if failure else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite '
        f'name="pytest" errors="0" failures="{int(bool(verdict))}" skipped="1" tests="4" '
        'time="4.2"><testcase classname="test_tracking" '
        'name="test_the_run_finished_in_its_experiment" time="0.8"/><testcase '
        'classname="test_tracking" name="test_each_training_param_is_logged_with_its_value'
        '[max_depth]" time="0.1"/>'
        f'<testcase classname="test_tracking" name="{SCORED}" time="3.3">{verdict}</testcase>'
        '<testcase classname="test_tracking" '
        'name="test_demo_model_is_right_on_every_held_out_sample" time="0.0"><skipped '
        'type="pytest.skip" message="fails on purpose, for the demo: set MLCI_DEMO_BREAK=1"/>'
        "</testcase></testsuite></testsuites>")
PASSWORD = "pg-s3cret-Lk8Q2"


def finished_well(obj: dict[str, Any]) -> bool:
    """Whether a pipeline's object ended as a run that logged to MLflow does."""
    status = obj.get("status") or {}
    return {"Job": lambda: condition_is(obj, "Complete"),
            "RayJob": lambda: status.get("jobStatus") == "SUCCEEDED",
            "SparkApplication": lambda: (status.get("applicationState") or {}).get(
                "state") == "COMPLETED"}[obj["kind"]]()


# (kind, name) of each example pipeline's object -> (experiment id, name) its run logs to.
LOGGED_TO = {("Job", "train"): ("7", "python-train"), ("RayJob", "ray-train"): ("8", "ray-train"),
             ("SparkApplication", "spark-features"): ("9", "spark-features")}


class MlflowStandIn(BaseHTTPRequestHandler):
    """The MLflow routes the example's ui_smoke checks, for each namespace (the first segment
    of the path, as the emulator routes `{namespace}`) as its pipelines left it: an experiment
    exists once the pipeline that logs to it ended well there (`logged_to`), and the one run
    MLflow knows is the train Job's. Anything else is MLflow's 404."""

    api: KubeApiServer
    logged_to: dict[tuple[str, str], tuple[str, str]]

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook)
        url = urlsplit(self.path)
        namespace, _, route = url.path.lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        experiments = self.experiments(namespace)
        if route == "":
            return self.reply(200, "<html><title>MLflow</title></html>", "text/html")
        if route.endswith("/experiments/get") and query.get("experiment_id") in experiments:
            return self.reply(200, {"experiment": {"experiment_id": query["experiment_id"],
                                                   "name": experiments[query["experiment_id"]]}})
        by_name = {name: id_ for id_, name in experiments.items()}
        if route.endswith("/experiments/get-by-name") and query.get(
                "experiment_name") in by_name:
            name = query["experiment_name"]
            return self.reply(200, {"experiment": {"experiment_id": by_name[name],
                                                   "name": name}})
        if route.endswith("/runs/get") and query.get("run_id") == RUN_ID and self.ran(
                namespace, "Job", "train"):
            return self.reply(200, {"run": {"info": {"run_id": RUN_ID, "status": "FINISHED"}}})
        return self.reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                "message": f"{route} {url.query}: not found"})

    def ran(self, namespace: str, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name and finished_well(o)
                   for o in self.api.objects(kind, namespace))

    def experiments(self, namespace: str) -> dict[str, str]:
        return {id_: experiment for (kind, name), (id_, experiment) in self.logged_to.items()
                if self.ran(namespace, kind, name)}

    def reply(self, status: int, body: object, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Cluster(NamedTuple):
    api: KubeApiServer
    controller: KubeController
    mlflow: type[MlflowStandIn]
    admin_requests: int  # how many requests the admin's setup made, all before the run's


Rule = dict[str, Any]


def rbac_documents(edit: Callable[[Rule], Rule | None] = lambda rule: rule
                   ) -> list[dict[str, Any]]:
    """deploy/rbac.yaml's objects, each ClusterRole rule as `edit` returns it (None: left
    out)."""
    documents = [d for d in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()) if d]
    for document in documents:
        if document["kind"] == "ClusterRole":
            document["rules"] = [r for r in map(edit, document["rules"]) if r is not None]
    return documents


def set_up_the_run_account(api: KubeApiServer, root: Path, rbac: list[dict[str, Any]]
                           ) -> Path:
    """As an admin installs the release (README: the namespace, `kubectl apply -f
    deploy/rbac.yaml`; the chart makes the service account), then a kubeconfig holding the
    run account's token, which is what its pods' in-cluster config holds."""
    with kubernetes.config.new_client_from_config(
            config_file=str(api.kubeconfig(root / "admin.kubeconfig"))) as admin:
        core = k8s.CoreV1Api(admin)
        core.create_namespace({"metadata": {"name": RUN_NAMESPACE}})
        core.create_namespaced_service_account(RUN_NAMESPACE,
                                               {"metadata": {"name": RUN_ACCOUNT}})
        k8s_utils.create_from_yaml(admin, yaml_objects=copy.deepcopy(rbac))
    token = api.service_account_token(RUN_NAMESPACE, RUN_ACCOUNT)
    return api.kubeconfig(root / "kubeconfig", token=token)


@pytest.fixture
def rbac() -> list[dict[str, Any]]:
    """What the admin applies: deploy/rbac.yaml as it is, unless a test says otherwise."""
    return rbac_documents()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rbac: list[dict[str, Any]]
            ) -> Iterator[Cluster]:
    """The emulated API server with RBAC on and its controller, $KUBECONFIG holding the run
    account's token, and every namespace's mlflow Service routed to the stand-in."""
    with KubeApiServer(rbac=True) as api, KubeController(api) as controller:
        mlflow = type("Mlflow", (MlflowStandIn,), {"api": api, "logged_to": dict(LOGGED_TO)})
        server = ThreadingHTTPServer(("127.0.0.1", 0), mlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("KUBECONFIG", str(set_up_the_run_account(api, tmp_path, rbac)))
        monkeypatch.setenv("MLCI_PG_PASSWORD", PASSWORD)
        api.route_service(None, "mlflow",
                          f"http://127.0.0.1:{server.server_address[1]}/{{namespace}}")
        controller.behave("Job", "train", log=TRAIN_LOG)
        controller.behave("Job", "model-tests", files={MODEL_TESTS: model_tests_report()})
        yield Cluster(api, controller, mlflow, len(api.request_log))
        server.shutdown()
        server.server_close()
        assert controller.errors == []


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


@pytest.mark.parametrize("key", [f"{config}|{engine}" for config in (
    "python-train", "ray-train", "spark-features") for engine in ("sqlite", "postgres")])
def test_kubernetes_example_passes_end_to_end(cluster, instance, key):
    api = cluster.api

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
    # All of it as the run pods' service account, through what deploy/rbac.yaml grants it.
    assert {user for user, _, _ in api.request_log[cluster.admin_requests:]} == {RUN_USER}


def test_the_job_log_gives_the_outputs_the_ui_smoke_checks(cluster, instance):
    result, record = run_partition(instance, EXAMPLE_K8S, "python-train|sqlite")

    outputs = stage_details(instance, result.run_id, "pipeline_runs")["outputs"]["train"]
    assert outputs == {"run_id": RUN_ID, "experiment_id": "7", "accuracy": "0.953"}
    assert record["metrics"]["accuracy"]["value"] == pytest.approx(0.953)
    checked = [r["url"] for r in stage_details(instance, result.run_id, "ui_smoke")["routes"]]
    assert any(f"run_id={RUN_ID}" in url for url in checked)


def test_the_model_tests_job_gives_the_record_each_tests_result(cluster, instance):
    """The model-tests Job's JUnit report reached the record through the API server alone (a
    pod's log, which the run account may read; no exec, no port-forward), test by test, and
    the Job had the run `train` printed to check."""
    api = cluster.api

    result, record = run_partition(instance, EXAMPLE_K8S, "python-train|sqlite")

    assert result.success
    assert record["tests"] == {"passed": 3, "failed": 0, "errors": 0, "skipped": 1}
    assert record["test_report_problems"] == []
    kept = read_report(Path(record["test_reports"]["model-tests"]))
    assert {c.name: str(c.status) for c in kept.cases} == {
        "test_the_run_finished_in_its_experiment": "pass",
        "test_each_training_param_is_logged_with_its_value[max_depth]": "pass",
        SCORED: "pass", "test_demo_model_is_right_on_every_held_out_sample": "skip"}
    assert not [path for _, path in api.requests
                if path.endswith(("/exec", "/attach", "/portforward"))]
    created = [event[1] for event in api.store.watch(TYPES["Job"], None, lambda o: True, "1", 0)
               if event is not None and event[0] == "ADDED"]  # the history: it is gone now
    [job] = [o for o in created if o["metadata"]["name"] == "model-tests"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["MLCI_RUN_ID"], env["MLCI_EXPERIMENT_ID"]) == (RUN_ID, "7")


def test_failing_model_tests_fail_the_run_naming_the_test(cluster, instance):
    cluster.controller.behave("Job", "model-tests", failure="fail", files={
        MODEL_TESTS: model_tests_report("AssertionError: accuracy 0.81 below 0.9")})

    result, record = run_partition(instance, EXAMPLE_K8S, "python-train|sqlite")

    assert not result.success
    assert record["status"] == "fail-pipeline_runs"
    assert record["tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}
    [failing] = record["failing_tests"]
    assert (failing["pipeline"], failing["status"]) == ("model-tests", "fail")
    assert failing["id"].endswith(SCORED)
    assert failing["message"].startswith("AssertionError: accuracy 0.81 below 0.9")
    assert mlci_namespaces(cluster.api) == []


def test_the_secret_reaches_the_cluster_but_no_record_log_or_event(cluster, instance,
                                                                   dagster_home):
    api = cluster.api

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
    api, controller = cluster.api, cluster.controller
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
    api, controller = cluster.api, cluster.controller
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
    # Its debug bundle was collected with the account's rights: nothing it could not read.
    bundle = stage_details(instance, result.run_id, "teardown")["debug_bundle"]
    with tarfile.open(bundle) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"k8s-objects.json", "k8s-events.json"} <= names
    assert "k8s-unreachable.txt" not in names


def test_ui_smoke_fails_when_the_pipeline_logged_to_another_experiment(cluster, instance):
    """The RayJob succeeds but its run went to an experiment the config does not check: MLflow
    has no `ray-train`, and the route that asks for it by name must say so (a stand-in that
    echoed the name asked for passed this)."""
    cluster.mlflow.logged_to[("RayJob", "ray-train")] = ("8", "ray-tune")

    result, record = run_partition(instance, EXAMPLE_K8S, "ray-train|sqlite")

    assert not result.success
    assert record["status"] == "fail-ui_smoke"
    assert record["stages"]["pipeline_runs"]["status"] == "pass"
    [route] = stage_details(instance, result.run_id, "ui_smoke")["routes"]
    assert route["status"] == 404 and route["problems"], route
    assert "experiment_name=ray-train" in route["url"]
    assert mlci_namespaces(cluster.api) == []


def without_rbac_objects(rule: Rule) -> Rule | None:
    return None if "rbac.authorization.k8s.io" in rule.get("apiGroups", []) else rule


def without_volume_claims(rule: Rule) -> Rule:
    """The rule without persistentvolumeclaims, which only the spark-driver Role uses."""
    return {**rule, "resources": [r for r in rule.get("resources", [])
                                  if r != "persistentvolumeclaims"]}


@pytest.mark.parametrize("rbac, refusal", [
    (rbac_documents(without_rbac_objects),
     [f'roles.rbac.authorization.k8s.io is forbidden: User "{RUN_USER}" cannot create '
      'resource "roles" in API group "rbac.authorization.k8s.io" in the namespace '
      '"spark-features-']),
    # (the summary keeps the head and the tail of a long message)
    (rbac_documents(without_volume_claims),
     [f'user "{RUN_USER}" (groups=["system:serviceaccounts" '
      f'"system:serviceaccounts:{RUN_NAMESPACE}" "system:authenticated"]) is attempting to '
      'grant RBAC permissions not currently held:\n{APIGroups:[""], '
      'Resources:["persistentvolumeclaims"], Verbs:["create" "get" "list" "watch" "delete" '
      '"deletecollection" "patch" "update"]}']),
], ids=["no-rbac-rule", "no-delegated-rule"])
def test_spark_features_needs_the_rules_rbac_yaml_gives_for_its_role(cluster, instance,
                                                                    refusal):
    """What deploy/rbac.yaml's rules for the example's Role are for: without the right to
    create Roles the sandbox cannot be made; without holding what the Role grants (and no
    `escalate`), the API server refuses the Role as an escalation."""
    result, record = run_partition(instance, EXAMPLE_K8S, "spark-features|postgres")

    assert not result.success
    assert record["status"] == "fail-sandbox"
    assert record["stages"]["sandbox"]["failure_kind"] == "infra"
    assert "k8s/spark-rbac.yaml#2: create Role spark-driver" in record["error_summary"]
    assert all(part in record["error_summary"] for part in refusal), record["error_summary"]
    assert mlci_namespaces(cluster.api) == []
