"""The one Definitions: six stage assets over config × engine, the job, schedule and sensor."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlci_dagster.assets.history import grid_report, history
from mlci_dagster.assets.lifecycle import lifecycle_assets
from mlci_dagster.assets.partitions import lifecycle_partitions
from mlci_dagster.paths import registry_path
from mlci_dagster.registry import load_registry
from mlci_dagster.resources.io import io_manager
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.schedules import nightly_schedule
from mlci_dagster.sensors.registry_sync import registry_sync

LIFECYCLE_JOB = "lifecycle"
HISTORY_JOB = "history_update"


def build_definitions(registry: str | Path) -> dg.Definitions:
    """Definitions for the registry at `registry`: its engines are the static partition axis."""
    engines = load_registry(registry).engines
    partitions = lifecycle_partitions(engines)
    assets = lifecycle_assets(partitions)
    # One partition's stages run in one process, in order: no process start-up per step.
    job = dg.define_asset_job(LIFECYCLE_JOB, selection=assets,
                              executor_def=dg.in_process_executor,
                              description="The whole lifecycle of one config × engine.")
    history_job = dg.define_asset_job(HISTORY_JOB, selection=[history, grid_report],
                                      executor_def=dg.in_process_executor,
                                      description="Consolidate results, analyse, draw the grid.")
    return dg.Definitions(
        assets=[*assets, history, grid_report],
        jobs=[job, history_job],
        schedules=[nightly_schedule(job)],
        sensors=[registry_sync],
        resources={"mlci": MlciResource(registry_path=str(Path(registry).resolve())),
                   "io_manager": io_manager()},
        executor=dg.in_process_executor,
    )


defs = build_definitions(registry_path())
