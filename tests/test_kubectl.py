"""A real `kubectl` against the Kubernetes API emulator (HTTPS, RBAC on, as a cluster is), for
the calls the provider makes: create and label a namespace, apply manifests (OpenAPI v3 and
server-side strict field validation, as kubectl 1.27+ does them), create a secret, get by short
name and by the `all` category, select by label, wait on a condition, read a pod's log and its
previous run's, reach a service through the API server's proxy, delete a namespace and wait for
it to go; and be refused by RBAC in a real server's words, as a token's user and as a client
certificate's. What kubectl prints is what a user of the emulated cluster would see.

Two real clients, each test run with both where it can: the kubectl on PATH (1.27 or later:
this machine's kind ships the Google Cloud CLI's 1.32) and Debian's kubernetes-client 1.20
(tests/support/services.py). The 1.20 one applies with `--validate=false`: it validates on the
client against OpenAPI v2, which it reads only as protobuf, and the emulator serves OpenAPI v3
alone; a server of its day also predates server-side field validation."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kube_controller import KubeController
from tests.support.kube_wire import KubeApiServer, echo_backend
from tests.support.services import DEBIAN_KUBECTL, KUBECTL, KUBECTL_DEBIAN, needs

ROOT = Path(__file__).resolve().parent.parent
MLFLOW = ROOT / "examples/ml-platform-k8s/k8s/mlflow.yaml"
JOB = """apiVersion: batch/v1
kind: Job
metadata: {name: train}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: train, image: 'example.test/train:1'}]
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeApiServer, KubeController, Path]]:
    with KubeApiServer(rbac=True, tls=True) as api, \
            KubeController(api, interval_s=0.05) as controller:
        controller.behave("Job", "train", log="epoch 1 loss=0.52\nrun_id=42\n")
        yield api, controller, api.kubeconfig(tmp_path / "kubeconfig.json")  # the admin's
        assert controller.errors == []


class Kubectl:
    """One kubectl binary and the kubeconfig it uses, its discovery cache beside the
    kubeconfig (a port used again by another test's server must not be served from another's
    cache)."""

    def __init__(self, binary: str, kubeconfig: Path) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig
        self.apply_flags = ["--validate=false"] if binary == str(DEBIAN_KUBECTL) else []

    def run(self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        kubeconfig = kubeconfig or self.kubeconfig
        return subprocess.run([self.binary, "--kubeconfig", str(kubeconfig), "--cache-dir",
                               str(kubeconfig.parent / "kube-cache"), *args],
                              input=stdin, capture_output=True, text=True, timeout=120)

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        """What a command that must succeed printed."""
        done = self.run(*args, stdin=stdin)
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def apply(self, *args: str, stdin: str | None = None) -> str:
        return self("apply", *self.apply_flags, *args, stdin=stdin)


@pytest.fixture(params=[pytest.param("kubectl", marks=needs(KUBECTL), id="kubectl"),
                        pytest.param(str(DEBIAN_KUBECTL), marks=needs(KUBECTL_DEBIAN),
                                     id="debian-kubectl-1.20")])
def kubectl(request: pytest.FixtureRequest, cluster) -> Kubectl:
    return Kubectl(request.param, cluster[2])


def test_apply_get_by_short_name_and_category_apply_again_and_delete(cluster, kubectl):
    api = cluster[0]
    kubectl("create", "namespace", "demo")

    applied = kubectl.apply("-n", "demo", "-f", str(MLFLOW))

    assert applied.splitlines() == ["deployment.apps/mlflow created", "service/mlflow created"]
    assert kubectl("get", "svc", "-n", "demo", "-o", "name").split() == ["service/mlflow"]
    everything = set(kubectl("get", "all", "-n", "demo", "-o", "name").split())
    assert {"deployment.apps/mlflow", "service/mlflow"} <= everything, everything
    assert any(name.startswith("pod/mlflow-") for name in everything), everything
    assert not any(name.startswith(("secret/", "configmap/")) for name in everything)
    again = kubectl.apply("-n", "demo", "-f", str(MLFLOW))
    assert again.splitlines() == ["deployment.apps/mlflow unchanged", "service/mlflow unchanged"]
    kubectl("delete", "namespace", "demo", "--timeout=60s")  # waits until it is gone
    assert "demo" not in api.namespaces()
    assert kubectl("get", "ns", "-o", "name").split().count("namespace/demo") == 0


@needs(KUBECTL)
def test_apply_is_refused_unknown_fields_by_strict_validation(cluster):
    """kubectl 1.27+ asks the server to validate (`fieldValidation=Strict`, or `Warn`)."""
    kubectl = Kubectl("kubectl", cluster[2])
    kubectl("create", "namespace", "demo")
    manifest = ("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                "spec: {selectorr: {app: web}, ports: [{port: 80, nam: http}]}\n")

    refused = kubectl.run("apply", "-n", "demo", "-f", "-", stdin=manifest)
    warned = kubectl.run("apply", "-n", "demo", "--validate=warn", "-f", "-",
                     stdin=manifest)

    assert refused.returncode == 1
    assert ('Service in version "v1" cannot be handled as a Service: strict decoding error: '
            'unknown field "spec.ports[0].nam", unknown field "spec.selectorr"') \
        in refused.stderr, refused.stderr
    assert warned.returncode == 0, warned.stderr
    assert 'Warning: unknown field "spec.selectorr"' in warned.stderr, warned.stderr
    assert kubectl("get", "svc", "-n", "demo", "-o", "name").split() == ["service/web"]


@pytest.fixture
def backend() -> Iterator[str]:
    with echo_backend() as url:
        yield url


def test_the_provider_s_calls_secrets_labels_waits_logs_and_the_service_proxy(cluster, kubectl,
                                                                             backend):
    api = cluster[0]
    kubectl("create", "namespace", "demo")
    kubectl("label", "namespace", "demo", "app.kubernetes.io/managed-by=mlci")
    kubectl("annotate", "namespace", "demo", "mlci.dev/expires=2026-12-07T06:00:00Z")
    kubectl("create", "secret", "generic", "creds", "-n", "demo",
       "--from-literal=API_TOKEN=s3cr3t")
    kubectl.apply("-n", "demo", "-f", "-", stdin=JOB)
    kubectl.apply("-n", "demo", "-f", str(MLFLOW))

    selected = kubectl("get", "ns", "-l", "app.kubernetes.io/managed-by=mlci", "-o",
                  "name")
    annotations = json.loads(kubectl("get", "ns", "demo", "-o", "json"))["metadata"][
        "annotations"]
    kubectl("wait", "-n", "demo", "--for=condition=Complete", "job/train",
       "--timeout=60s")
    pod = json.loads(kubectl("get", "pods", "-n", "demo", "-l", "job-name=train", "-o",
                        "json"))["items"][0]["metadata"]["name"]
    logs = kubectl("logs", "-n", "demo", pod)
    previous = kubectl.run("logs", "-n", "demo", pod, "--previous")
    kubectl("wait", "-n", "demo", "--for=condition=Available", "deployment/mlflow",
       "--timeout=60s")
    api.route_service("demo", "mlflow", backend)
    proxied = kubectl("get", "--raw",
                 "/api/v1/namespaces/demo/services/mlflow:5000/proxy/api/2.0/mlflow/ping")

    assert selected.split() == ["namespace/demo"]
    assert annotations["mlci.dev/expires"] == "2026-12-07T06:00:00Z"
    secret = api.objects("Secret", "demo")[0]
    assert secret["metadata"]["name"] == "creds" and secret["data"] == {"API_TOKEN": "czNjcjN0"}
    assert logs == "epoch 1 loss=0.52\nrun_id=42\n"
    assert previous.returncode == 1
    assert (f'previous terminated container "train" in pod "{pod}" not found'
            in previous.stderr), previous.stderr
    assert json.loads(proxied) == {"path": "/api/2.0/mlflow/ping", "ok": True}


def test_rbac_refuses_in_a_real_servers_words_a_token_and_a_client_certificate(cluster, kubectl,
                                                                              tmp_path):
    api = cluster[0]
    kubectl("create", "namespace", "demo")
    kubectl("create", "serviceaccount", "reader", "-n", "demo")
    token = api.service_account_token("demo", "reader")
    jane = api.kubeconfig(tmp_path / "jane.json", client_certificate=("jane", ["ml-team"]))

    by_token = kubectl.run("--token", token, "get", "secrets", "-n", "demo")
    by_certificate = kubectl.run("delete", "namespace", "demo", kubeconfig=jane)
    nobody = kubectl.run("--token", "not-a-token", "get", "pods", "-n", "demo")

    assert by_token.returncode == 1
    assert ('Error from server (Forbidden): secrets is forbidden: User '
            '"system:serviceaccount:demo:reader" cannot list resource "secrets" in API group "" '
            'in the namespace "demo"') in by_token.stderr, by_token.stderr
    assert by_certificate.returncode == 1
    assert ('Error from server (Forbidden): namespaces "demo" is forbidden: User "jane" cannot '
            'delete resource "namespaces" in API group "" in the namespace "demo"') \
        in by_certificate.stderr, by_certificate.stderr
    assert nobody.returncode == 1
    assert "error: You must be logged in to the server (Unauthorized)" in nobody.stderr, \
        nobody.stderr
    assert "demo" in api.namespaces()
