"""One invalid registry file never stops the daemon: the code location loads, the cleanup
sensors keep reaping, the other configs keep running, and the UI says which file and field is
wrong. `mlci` itself stays strict (nothing is registered or run while any problem remains)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlci_dagster.assets.partitions import partition_changes
from mlci_dagster.assets.registry import VALID_CHECK
from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.operations import sync_partitions
from mlci_dagster.providers.local import LocalProvider
from mlci_dagster.registry import RegistryError, load_registry, loader
from mlci_dagster.registry.loader import load_usable_registry
from mlci_dagster.sensors.cleanup import sandbox_janitor
from tests.support.registries import config, write_registry
from tests.support.runs import QUIET, processes_of_sandbox
from tests.test_cleanup import start_sandbox

NEGATIVE = "timeouts.sandbox_s: Input should be greater than 0"


@pytest.fixture(autouse=True)
def files_read_at_once(monkeypatch):
    """The daemon's registry is read again at most every 2 s; here at every call."""
    monkeypatch.setattr(loader, "RECHECK_S", 0.0)
    loader._cache.clear()
    yield
    loader._cache.clear()


def break_config(root: Path, name: str) -> Path:
    path = root / "configs" / f"{name}.yaml"
    body = yaml.safe_load(path.read_text())
    body["timeouts"]["sandbox_s"] = -5
    path.write_text(yaml.safe_dump(body))
    return path


def test_one_invalid_config_stops_no_automation_and_the_ui_names_file_and_field(
        instance, dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("c"), config("b")])
    instance.add_dynamic_partitions("config", ["c", "b"])
    build_definitions(registry)  # the daemon loaded it while it was valid
    provider = LocalProvider(dagster_home / "mlci")
    left = start_sandbox(provider, registry, "a-run-that-is-over")
    broken = break_config(registry, "b")

    definitions = build_definitions(registry)  # a reload of the code location

    # The janitor still reaps.
    with dg.build_sensor_context(instance=instance,
                                 resources=definitions.resources) as context:
        janitor = sandbox_janitor(context)
    [observation] = janitor.asset_events
    assert observation.metadata["sandboxes"].value[0]["sandbox_id"] == left.sandbox_id
    assert processes_of_sandbox(left.sandbox_id) == []
    # registry_sync says which file and field, and removes no partition meanwhile.
    with dg.build_sensor_context(instance=instance,
                                 resources=definitions.resources) as context:
        sync = definitions.resolve_sensor_def("registry_sync")(context)
    [check] = sync.asset_events
    assert (check.check_name, check.passed) == (VALID_CHECK, False)
    assert check.description == f"configs/b.yaml: {NEGATIVE}; left out until fixed: b"
    assert f"`{broken}: {NEGATIVE}`" in check.metadata["problems"].value
    assert not any(isinstance(r, dg.DeleteDynamicPartitionsRequest)
                   for r in sync.dynamic_partitions_requests)
    # The nightly runs the valid configs.
    tick = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    with dg.build_schedule_context(instance=instance, resources=definitions.resources,
                                   repository_def=definitions.get_repository_def(),
                                   scheduled_execution_time=tick) as context:
        requests = definitions.resolve_schedule_def("nightly").evaluate_tick(context).run_requests
    assert [r.partition_key for r in requests] == ["c|e1"]
    # A run of the invalid config is refused before any stage, saying why.
    result = definitions.resolve_job_def(LIFECYCLE_JOB).execute_in_process(
        partition_key="b|e1", instance=instance, raise_on_error=False, run_config=QUIET)
    [failure] = result.get_step_failure_events()
    assert f"config 'b' is invalid: {broken}: {NEGATIVE}" in \
        failure.step_failure_data.error.message
    # Fixed, the check goes green once.
    (registry / "configs" / "b.yaml").write_text(yaml.safe_dump(config("b")))
    with dg.build_sensor_context(instance=instance, resources=definitions.resources,
                                 cursor=sync.cursor) as context:
        fixed = definitions.resolve_sensor_def("registry_sync")(context)
    assert [(e.check_name, e.passed) for e in fixed.asset_events] == [(VALID_CHECK, True)]


def test_mlci_stays_strict_while_the_daemon_uses_what_is_valid(tmp_path):
    registry = write_registry(tmp_path / "reg", [config("c"), config("b")])
    previous = load_usable_registry(registry)
    broken = break_config(registry, "b")

    with pytest.raises(RegistryError) as strict:
        load_registry(registry)
    usable = load_usable_registry(registry, previous)

    assert strict.value.problems == [f"{broken}: {NEGATIVE}"]
    assert list(usable.configs) == ["c"]
    assert usable.invalid == {"b": (f"{broken}: {NEGATIVE}",)}
    assert usable.held_over["b"] == previous.configs["b"]  # the janitor still sweeps it
    assert usable.partition_problem("b", "e1").startswith("config 'b' is invalid: ")


def test_every_partition_sync_keeps_an_invalid_configs_partition(instance, tmp_path):
    """The sensor and the operations `mlci` calls share one rule: while a file is invalid, no
    partition is deleted, even of a config that is no longer listed."""
    registry = write_registry(tmp_path / "reg", [config("c"), config("b"), config("gone")])
    instance.add_dynamic_partitions("config", ["c", "b", "gone"])
    previous = load_usable_registry(registry)
    (registry / "configs" / "gone.yaml").unlink()
    break_config(registry, "b")
    usable = load_usable_registry(registry, previous)

    assert partition_changes(usable, {"c", "b", "gone"}) == ([], [])
    assert sync_partitions(instance, usable) == ([], [])
    assert sorted(instance.get_dynamic_partitions("config")) == ["b", "c", "gone"]
    (registry / "configs" / "b.yaml").write_text(yaml.safe_dump(config("b")))  # fixed
    assert sync_partitions(instance, load_usable_registry(registry, usable)) == ([], ["gone"])


def test_an_invalid_mlci_yaml_keeps_the_last_valid_one(tmp_path, dagster_home):
    registry = write_registry(tmp_path / "reg", [config("c")])
    snapshot = loader.snapshot_path(registry.resolve())
    assert snapshot is not None and str(snapshot).startswith(str(dagster_home))
    valid = load_usable_registry(registry, snapshot=snapshot)  # keeps a copy of mlci.yaml
    (registry / "mlci.yaml").write_text("engines: {e1: {variables: [not, a, mapping]}}\n")

    in_process = load_usable_registry(registry, previous=valid, snapshot=snapshot)
    restarted = load_usable_registry(registry, snapshot=snapshot)

    for usable in (in_process, restarted):
        assert list(usable.configs) == ["c"] and usable.engines == ["e1"]
        assert any("mlci.yaml: engines.e1.variables" in p for p in usable.problems)
        assert usable.settings_from.startswith("the last valid mlci.yaml")
    snapshot.unlink()
    with pytest.raises(RegistryError):  # never seen valid: nothing to stand in
        load_usable_registry(registry, snapshot=snapshot)
    assert os.path.exists(registry / "mlci.yaml")
