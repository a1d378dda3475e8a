"""Running a partition's lifecycle on a test instance and reading what it leaves: its results
record (`run_partition`, `latest_record`), a stage's details (`stage_details`), the processes,
ports, directories and ledger entries of its sandbox (`processes_of_sandbox`,
`assert_no_leaks`); and a valid results record built by hand (`result_record`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.providers.host import SANDBOX_ID_ENV
from mlci_dagster.providers.ports import port_is_free
from mlci_dagster.providers.processes import marked_processes

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_partition(instance: dg.DagsterInstance, registry: Path, key: str):
    """Runs one partition's lifecycle on the instance; returns (run result, results record)."""
    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    instance.add_dynamic_partitions("config", [key.split("|")[0]])
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                    run_config=QUIET)
    return result, latest_record(instance, key)


def latest_record(instance: dg.DagsterInstance, key: str) -> dict[str, Any] | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RESULTS_ASSET, asset_partitions=[key]), limit=1
    ).records
    return dict(records[0].asset_materialization.metadata["record"].value) if records else None


def stage_details(instance: dg.DagsterInstance, run_id: str, stage: str) -> dict[str, Any]:
    """The `details` of a stage's materialization in one run, read from that run's own events
    (the same source a test waits on, so there is no index lag to race)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is not None and materialization.asset_key == dg.AssetKey(stage):
            return dict(materialization.metadata["details"].value)
    raise AssertionError(f"no {stage} materialization in run {run_id}")


def processes_of_sandbox(sandbox_id: str) -> list[int]:
    """Live processes started for a sandbox: each carries MLCI_SANDBOX_ID in its environment."""
    return marked_processes(SANDBOX_ID_ENV, sandbox_id)


def assert_no_leaks(dagster_home: Path, handle: dict[str, Any]) -> None:
    assert processes_of_sandbox(handle["sandbox_id"]) == []
    assert [p for p in handle["ports"].values() if not port_is_free(p)] == []
    assert not Path(handle["workdir"]).exists()
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


def result_record(partition: str, status: str, started_at: float, digest: str = "d1",
                  kind: str | None = None, duration: float = 1.0,
                  cost: float | None = None) -> ResultRecord:
    """A valid results record, as the lifecycle writes it, with the fields a rule reads."""
    config, engine = partition.split("|")
    failed = None if status in ("pass", "skip") else status.removeprefix("fail-")
    return ResultRecord.model_validate({
        "partition": partition, "config": config, "engine": engine, "config_id": "c1",
        "status": status, "failed_stage": failed, "cost_usd": cost,
        "failure_kind": kind or (None if failed is None else "product"),
        "image_digest": digest, "code_version": "v1", "trigger": "schedule",
        "run_id": f"run-{partition}-{started_at}", "started_at": started_at,
        "finished_at": started_at + 60, "duration_s": duration,
        "stages": {"image": {"status": "pass", "duration_s": duration}},
        "pipelines": {"train": {"passed": status == "pass", "duration_s": duration}},
        "metrics": {}})
