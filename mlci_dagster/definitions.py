"""The one Definitions: six stage assets over config × engine, the job, schedule and sensor."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlci_dagster.assets.lifecycle import lifecycle_assets
from mlci_dagster.assets.partitions import lifecycle_partitions
from mlci_dagster.paths import registry_path
from mlci_dagster.registry import load_registry
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.schedules import nightly_schedule
from mlci_dagster.sensors.registry_sync import registry_sync

LIFECYCLE_JOB = "lifecycle"


def build_definitions(registry: str | Path) -> dg.Definitions:
    """Definitions for the registry at `registry`: its engines are the static partition axis."""
    engines = load_registry(registry).engines
    partitions = lifecycle_partitions(engines)
    assets = lifecycle_assets(partitions)
    # One partition's stages run in one process, in order: no process start-up per step.
    job = dg.define_asset_job(LIFECYCLE_JOB, selection=assets,
                              executor_def=dg.in_process_executor,
                              description="The whole lifecycle of one config × engine.")
    return dg.Definitions(
        assets=assets,
        jobs=[job],
        schedules=[nightly_schedule(job)],
        sensors=[registry_sync],
        resources={"mlci": MlciResource(registry_path=str(Path(registry).resolve()))},
        executor=dg.in_process_executor,
    )


defs = build_definitions(registry_path())
