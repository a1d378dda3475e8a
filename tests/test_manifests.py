"""Every Kubernetes manifest the project ships (the examples' and deploy/rbac.yaml) against the
official OpenAPI schemas, as `kubernetes-validate` (PyPI) bundles them from kubernetes/kubernetes
`api/openapi-spec`, strictly (an unknown field is an error, as `kubectl apply --validate=strict`
makes it). Custom resources have no schema there: KubeRay's RayJob and the Spark operator's
SparkApplication are named here, so that no other kind goes unchecked; their fields are the ones
the emulator's controller and the provider's tests read (kuberay `ray-operator/apis/ray/v1`,
kubeflow/spark-operator `api/v1beta2`)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("examples/*/k8s/*.yaml"), ROOT / "deploy" / "rbac.yaml"])
CUSTOM_RESOURCES = {("ray.io/v1", "RayJob"), ("sparkoperator.k8s.io/v1beta2", "SparkApplication")}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def test_every_shipped_manifest_is_found():
    assert {p.relative_to(ROOT).as_posix() for p in SHIPPED} >= {
        "deploy/rbac.yaml", "examples/ml-platform-k8s/k8s/mlflow.yaml",
        "examples/ml-platform-k8s/k8s/spark-rbac.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_shipped_manifest_is_valid_against_the_official_schemas(path):
    checked = []
    for document in documents(path):
        kind = (document.get("apiVersion"), document.get("kind"))
        if kind in CUSTOM_RESOURCES:
            continue
        # `${...}` references stand only in string fields, so a template validates as is.
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(),
                                     strict=True)
        checked.append(kind)
    assert checked or all((d.get("apiVersion"), d.get("kind")) in CUSTOM_RESOURCES
                          for d in documents(path))


def test_the_validation_catches_a_misspelt_field_and_an_unknown_kind():
    deployment = documents(ROOT / "examples/ml-platform-k8s/k8s/mlflow.yaml")[0]
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(misspelt, kubernetes_validate.latest_version(), strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "example.com/v1", "kind": "Widget",
                                      "metadata": {"name": "w"}},
                                     kubernetes_validate.latest_version(), strict=True)
