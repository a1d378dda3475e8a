"""The Kubernetes example on a real cluster: every partition of examples/ml-platform-k8s, real
pods, KubeRay and the Spark operator, MLflow reached through the real API server's service
proxy, then no namespace left.

Skipped unless MLCI_KUBECONFIG names a kubeconfig (a k3d or kind cluster with KubeRay and the
Spark operator installed, see the README) and MLCI_K8S_IMAGE an image built from
examples/ml-platform-k8s/image/Dockerfile that the cluster can pull.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from mlci_dagster.paths import EXAMPLE_REGISTRY
from tests.support.runs import run_partition

KUBECONFIG = os.environ.get("MLCI_KUBECONFIG", "")
IMAGE = os.environ.get("MLCI_K8S_IMAGE", "")
pytestmark = pytest.mark.skipif(
    not (KUBECONFIG and IMAGE),
    reason="real cluster: set MLCI_KUBECONFIG (a cluster with KubeRay and the Spark operator) "
           "and MLCI_K8S_IMAGE (examples/ml-platform-k8s/image/Dockerfile, pushed)")
PARTITIONS = [f"{c}|{e}" for c in ("python-train", "ray-train", "spark-features")
              for e in ("sqlite", "postgres")]


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example, its image reference replaced by MLCI_K8S_IMAGE."""
    root = shutil.copytree(EXAMPLE_REGISTRY.parent / "ml-platform-k8s", tmp_path / "registry")
    for path in (root / "configs").glob("*.yaml"):
        body = yaml.safe_load(path.read_text())
        body["image"] = {"ref": IMAGE}
        path.write_text(yaml.safe_dump(body))
    monkeypatch.setenv("KUBECONFIG", KUBECONFIG)
    monkeypatch.setenv("MLCI_PG_PASSWORD", os.environ.get("MLCI_PG_PASSWORD", "mlci-test"))
    return root


@pytest.mark.parametrize("key", PARTITIONS)
def test_kubernetes_example_passes_on_a_real_cluster(registry, instance, key):
    result, record = run_partition(instance, registry, key)

    assert record["status"] == "pass", record["error_summary"]
    assert result.success
    if key.startswith("python-train|"):  # the model-tests Job's report, via its sidecar
        assert record["test_report_problems"] == []
        assert record["tests"]["passed"] >= 22, record["tests"]
        assert (record["tests"]["failed"], record["tests"]["errors"]) == (0, 0)
    api = client.CoreV1Api(config.new_client_from_config(config_file=KUBECONFIG))
    left = api.list_namespace(label_selector=f"mlci.dev/run-id={result.run_id}").items
    assert [ns.metadata.name for ns in left] == []
