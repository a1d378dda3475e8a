"""The one Definitions: the lifecycle assets over config × engine, history, the jobs, the
nightly schedule and the sensors."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlci_dagster.assets.culprits import culprit_search, find_culprit
from mlci_dagster.assets.external import (
    JANITOR_ASSET,
    SIGNATURES_ASSET,
    commit_summary,
    pull_request_label,
    pushed_image,
    release_qualification,
    run_artifacts,
)
from mlci_dagster.assets.history import grid_report, history, published_site, test_history
from mlci_dagster.assets.lifecycle import lifecycle_assets
from mlci_dagster.assets.partitions import lifecycle_partitions
from mlci_dagster.assets.registry import REGISTRY_ASSET, REGISTRY_CHECKS
from mlci_dagster.assets.reservations import reservation_definitions
from mlci_dagster.launch.pools import pool_of
from mlci_dagster.paths import registry_path
from mlci_dagster.registry.loader import load_registry_cached
from mlci_dagster.resources.io import io_manager
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.resources.notify import notifier_resource, root_cause_resource
from mlci_dagster.schedules import hold_schedules, nightly_schedule
from mlci_dagster.sensors.artifacts import artifact_upload
from mlci_dagster.sensors.cleanup import (
    sandbox_janitor,
    teardown_after_cancel,
    teardown_after_failure,
)
from mlci_dagster.sensors.commits import commit_poll_sensor, commit_status, pr_label_sensor
from mlci_dagster.sensors.culprits import culprit_search_sensor
from mlci_dagster.sensors.history_update import history_update_sensor
from mlci_dagster.sensors.image_build import image_poll_sensor, image_push_sensor
from mlci_dagster.sensors.notify import notify
from mlci_dagster.sensors.registry_sync import registry_sync
from mlci_dagster.sensors.reruns import deflake_reruns_sensor
from mlci_dagster.sensors.retention import artifact_retention
from mlci_dagster.sensors.stale_scanner import stale_scanner
from mlci_dagster.vocabulary import POOL_TAG, split_partition_key

LIFECYCLE_JOB = "lifecycle"
HISTORY_JOB = "history_update"


def pool_tagged_config(
    registry: str | Path, partitions: dg.PartitionsDefinition
) -> dg.PartitionedConfig:
    """Every run of a partition, however started (schedule, sensor, backfill, UI), is tagged
    with its config's pool, which the run queue's tag concurrency limits count."""

    def tags(key: str) -> dict[str, str]:
        config, _ = split_partition_key(key)
        loaded = load_registry_cached(registry)
        # A config the registry lacks gets no pool: its run is refused before any stage.
        return {POOL_TAG: pool_of(loaded, config)} if config in loaded.configs else {}

    return dg.PartitionedConfig(partitions_def=partitions,
                                run_config_for_partition_key_fn=lambda key: {},
                                tags_for_partition_key_fn=tags)


def build_definitions(registry: str | Path) -> dg.Definitions:
    """Definitions for the registry at `registry`: its engines are the static partition axis."""
    # The registry as far as it is valid: one invalid file never stops the location (the
    # janitor, the cleanup sensors, the other configs), see load_usable_registry.
    settings = load_registry_cached(registry).settings
    partitions = lifecycle_partitions(list(settings.engines))
    lifecycle = lifecycle_assets(partitions)
    job = dg.define_asset_job(LIFECYCLE_JOB, selection=[lifecycle],
                              executor_def=dg.in_process_executor,
                              config=pool_tagged_config(registry, partitions),
                              description="The whole lifecycle of one config × engine.")
    history_job = dg.define_asset_job(
        HISTORY_JOB, selection=[history, test_history, grid_report, published_site],
        executor_def=dg.in_process_executor,
        description="Consolidate results, analyse, draw the grid, publish it to the store.")
    reserved = reservation_definitions(settings)
    return dg.Definitions(
        assets=[lifecycle, history, test_history, grid_report, published_site, JANITOR_ASSET,
                REGISTRY_ASSET,
                pushed_image, pull_request_label, commit_summary, release_qualification,
                SIGNATURES_ASSET, culprit_search, run_artifacts, *reserved["assets"]],
        asset_checks=[*reserved["asset_checks"], *REGISTRY_CHECKS],
        jobs=[job, history_job, find_culprit, *reserved["jobs"]],
        schedules=[nightly_schedule(job, settings.nightly),
                   *hold_schedules(settings, reserved["jobs"])],
        sensors=[registry_sync, sandbox_janitor, teardown_after_failure, teardown_after_cancel,
                 notify, image_poll_sensor(job, settings.image_poll_interval_s),
                 image_push_sensor(job), stale_scanner(job),
                 history_update_sensor(history_job), pr_label_sensor(job), commit_status,
                 culprit_search_sensor(job), deflake_reruns_sensor(job), artifact_upload,
                 artifact_retention,
                 commit_poll_sensor(job, settings.repository.poll_interval_s
                                    if settings.repository else 60)],
        resources={"mlci": MlciResource(registry_path=str(Path(registry).resolve())),
                   "io_manager": io_manager(), "notifier": notifier_resource(),
                   "root_cause": root_cause_resource()},
        executor=dg.in_process_executor,
    )


defs = build_definitions(registry_path())
