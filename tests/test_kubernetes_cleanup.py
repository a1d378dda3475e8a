"""Cleanup in layers on the Kubernetes provider, against the loopback API emulator
(tests/support/kube_wire.py) spoken to through the official client: a SIGKILLed lifecycle leaves
no namespace once the janitor and the run-failure sensor have run, and the janitor reaps a
namespace it knows only from the cluster's labels when the local ledger is lost. What is left is
counted through the API: the mlci-labelled namespaces it still lists."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from mlci_dagster.definitions import build_definitions
from mlci_dagster.providers.janitor import registry_providers
from mlci_dagster.registry import load_registry
from mlci_dagster.sensors.cleanup import sandbox_janitor
from tests.support.injection import (
    emulated_cluster,
    inject,
    listed_namespaces,
    write_kubernetes_registry,
)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Path]:
    with emulated_cluster(tmp_path / "cluster") as kubeconfig:
        yield write_kubernetes_registry(tmp_path / "registry", kubeconfig)


def test_sigkill_in_pipeline_runs_leaves_no_namespace_after_the_cleanup_layers(
        registry, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))  # inject sets it; restored after

    result = inject("pipeline_runs", tmp_path / "home", registry)

    assert result["sandboxes"] == 1
    assert len(result["crash_details"]["namespaces"]) == 1  # the crash left the namespace
    assert result["details"]["namespaces"] == []  # the API lists it no more
    assert result["leaks"] == 0, result["details"]
    assert result["run_status"] == dg.DagsterRunStatus.FAILURE  # the janitor ended it
    assert result["results"] == 0  # never recorded, least of all as a pass


def test_the_janitor_reaps_a_namespace_known_only_by_its_labels_when_the_ledger_is_lost(
        registry, instance, dagster_home):
    spec = load_registry(registry).configs["inject"].config.sandbox
    kubeconfig = registry / spec.cluster.kubeconfig
    [provider] = [p for p in registry_providers(load_registry(registry), dagster_home / "mlci")
                  if p.name == "kubernetes"]
    run_id = str(uuid.uuid4())  # a run the instance never heard of: over
    handle = provider.create(spec, config="inject", engine="e1", run_id=run_id,
                             engine_variables={}, teardown_s=60)
    # Lose everything but the labels: the ledger, and the handle the namespace carries.
    shutil.rmtree(dagster_home / "mlci" / "ledger")
    with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api:
        core = k8s.CoreV1Api(api)
        core.patch_namespace(
            handle.sandbox_id, {"metadata": {"annotations": {"mlci.dev/handle": None}}},
            _content_type="application/merge-patch+json")
        assert "mlci.dev/handle" not in (
            core.read_namespace(handle.sandbox_id).metadata.annotations or {})
    assert listed_namespaces(kubeconfig, run_id) == [handle.sandbox_id]

    with dg.build_sensor_context(instance=instance,
                                 resources=build_definitions(registry).resources) as context:
        result = sandbox_janitor(context)

    [observation] = result.asset_events
    [reaped] = observation.metadata["sandboxes"].value
    assert (reaped["sandbox_id"], reaped["run_id"]) == (handle.sandbox_id, run_id)
    assert reaped["report"]["clean"] and reaped["report"]["remote"]["namespace_gone"], \
        reaped["report"]
    assert listed_namespaces(kubeconfig, run_id) == []
