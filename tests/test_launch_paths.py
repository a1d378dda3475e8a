"""Every way the Dagster UI launches lifecycle runs, sent to a real `dagster-webserver` as the UI
sends it (its GraphQL API), with a real `dagster-daemon` dequeuing: a partial selection of the
lifecycle is refused, and every run, asset backfills included, respects its pool's limit."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from mlci_dagster.assets.history import HISTORY, stored_cursor
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.launch.coordinator import PoolTaggingRunCoordinator, pool_of_run
from mlci_dagster.vocabulary import POOL_TAG, RESULTS, STAGES
from tests.support.dagster_services import (
    LAUNCH_BACKFILL,
    LAUNCH_RUN,
    daemon,
    graphql,
    service_env,
    wait_until,
    webserver,
)
from tests.support.registries import PY, command_pipeline, config, write_registry

LIFECYCLE = [*map(str, STAGES), RESULTS]


def pooled_registry(root: Path) -> Path:
    """Configs a and b in pool `gpu` (limit 1), each a 3 s pipeline and nothing else."""
    slow = command_pipeline("train", "import time; time.sleep(3)")
    gpu = {"services": [], "pool": "gpu"}
    write_registry(root, [config(n, sandbox=gpu, pipelines=[slow], ui_smoke={"routes": []})
                          for n in ("a", "b")], engines={"e1": {}})
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    settings["pools"] = {"gpu": {"limit": 1}}
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings))
    return root


def slow_synced_registry(root: Path, dagster_home: Path) -> Path:
    """Config `slow` (a web service, a 50 s pipeline), synced into the home for the daemon."""
    from tests.support.registries import http_service

    slow = command_pipeline("train", "import time; time.sleep(50)", timeout_s=60)
    registry = write_registry(root, [config(
        "slow", sandbox={"services": [http_service()]}, pipelines=[slow],
        ui_smoke={"routes": []})], engines={"e1": {}})
    subprocess.run([PY, "-m", "mlci_dagster.cli", "sync"], env=service_env(dagster_home, registry),
                   check=True, timeout=120, capture_output=True)
    return registry


def asset_job_params(assets: list[str], partition: str) -> dict:
    """What the UI's Materialize button sends for `assets` of one partition (with their
    checks, as the UI selects them)."""
    checks = [{"assetKey": {"path": [a]}, "name": "lifecycle_passed" if a == RESULTS
               else "stage_passed"} for a in assets]
    return {"mode": "default", "runConfigData": {},
            "selector": {"repositoryLocationName": "mlci_dagster.definitions",
                         "repositoryName": "__repository__", "pipelineName": "__ASSET_JOB",
                         "assetSelection": [{"path": [a]} for a in assets],
                         "assetCheckSelection": checks},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}


def test_the_coordinator_tags_an_asset_job_run_with_its_partitions_pool(tmp_path, monkeypatch):
    registry = pooled_registry(tmp_path / "reg")
    monkeypatch.setenv("MLCI_REGISTRY", str(registry))
    asset_run = dg.DagsterRun(job_name="__ASSET_JOB", tags={"dagster/partition": "b|e1"},
                              asset_selection=frozenset({dg.AssetKey("results")}))
    history_run = dg.DagsterRun(job_name="__ASSET_JOB",
                                asset_selection=frozenset({dg.AssetKey("history")}))

    assert pool_of_run(asset_run, str(registry)) == "gpu"
    assert pool_of_run(history_run, str(registry)) is None
    assert issubclass(PoolTaggingRunCoordinator, dg.QueuedRunCoordinator)


@pytest.mark.daemon
def test_ui_launches_refuse_partial_lifecycles_and_every_run_respects_the_pool(
        tmp_path, dagster_home, instance):
    registry = pooled_registry(tmp_path / "reg")
    env = service_env(dagster_home, registry)
    sync = subprocess.run([PY, "-m", "mlci_dagster.cli", "sync"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert "pool limits: gpu=1" in sync.stdout, sync.stdout + sync.stderr
    assert yaml.safe_load((dagster_home / "dagster.yaml").read_text())["run_coordinator"][
        "class"] == "PoolTaggingRunCoordinator"

    with webserver(dagster_home, registry, tmp_path / "web.log") as url:
        # One asset's Materialize button: refused, naming the assets that must come along.
        partial = graphql(url, LAUNCH_RUN, {"params": asset_job_params(["sandbox"], "a|e1")})
        outcome = partial["launchPipelineExecution"]
        assert outcome["__typename"] != "LaunchRunSuccess"
        assert "does not support subsetting" in outcome["message"]
        assert "results" in outcome["message"]  # the rest of the lifecycle is named
        # A backfill of `results` alone: refused too.
        partial_backfill = graphql(url, LAUNCH_BACKFILL, {"params": {
            "partitionNames": ["a|e1"], "assetSelection": [{"path": [RESULTS]}]}})
        outcome = partial_backfill["launchPartitionBackfill"]
        assert outcome["__typename"] == "PythonError"
        assert "must include every key in a non-subsettable multi-asset" in outcome["message"]

        # The whole lifecycle of one partition, and an asset backfill of both partitions.
        single = graphql(url, LAUNCH_RUN, {"params": asset_job_params(LIFECYCLE, "a|e1")})
        assert single["launchPipelineExecution"]["__typename"] == "LaunchRunSuccess"
        backfill = graphql(url, LAUNCH_BACKFILL, {"params": {
            "partitionNames": ["a|e1", "b|e1"],
            "assetSelection": [{"path": [a]} for a in LIFECYCLE]}})
        assert backfill["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess"

        most_in_progress = 0
        log = tmp_path / "daemon.log"
        with daemon(dagster_home, registry, log):
            deadline = time.monotonic() + 300

            def lifecycle_runs() -> list[dg.DagsterRun]:
                """Every lifecycle run; the stale scanner may add its own for the pool too."""
                return [r for r in instance.get_runs() if r.tags.get("dagster/partition")]

            def launched_here(runs: list[dg.DagsterRun]) -> list[dg.DagsterRun]:
                return [r for r in runs if "dagster/sensor_name" not in r.tags]

            while time.monotonic() < deadline:
                runs = lifecycle_runs()
                in_progress = [r for r in runs if r.status in (
                    dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)]
                most_in_progress = max(most_in_progress, len(in_progress))
                if len(launched_here(runs)) == 3 and all(r.is_finished for r in runs):
                    break
                time.sleep(0.2)
            all_runs = lifecycle_runs()
            runs = launched_here(all_runs)
            # History follows under the daemon with no toggle: the history_update sensor.
            newest = instance.fetch_materializations(RESULTS_ASSET, limit=1).records[0]
            wait_until(lambda: stored_cursor(instance, HISTORY) >= newest.storage_id, 90,
                       "history to hold the newest result", log)

    assert sorted(r.tags["dagster/partition"] for r in runs) == ["a|e1", "a|e1", "b|e1"]
    assert {r.tags.get(POOL_TAG) for r in all_runs} == {"gpu"}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in all_runs), [
        r.status for r in all_runs]
    assert most_in_progress == 1
    records = sorted((instance.get_run_record_by_id(r.run_id) for r in all_runs),
                     key=lambda r: r.start_time)
    for first, second in zip(records, records[1:], strict=False):
        assert second.start_time >= first.end_time  # one after the other, never side by side


@pytest.mark.daemon
def test_a_daemon_run_whose_worker_is_killed_is_marked_failed_and_its_sandbox_reaped(
        tmp_path, dagster_home, instance):
    """Under the daemon, Dagster itself notices a run worker that died (its code server reports
    the run failed); the teardown_after_failure sensor then reaps the sandbox."""
    from tests.support.injection import stage_in_progress
    from tests.support.runs import processes_of_sandbox, stage_details

    registry = slow_synced_registry(tmp_path / "reg", dagster_home)
    log = tmp_path / "daemon.log"
    with webserver(dagster_home, registry, tmp_path / "web.log") as url, \
            daemon(dagster_home, registry, log):
        launched = graphql(url, LAUNCH_RUN, {"params": asset_job_params(LIFECYCLE, "slow|e1")})
        run_id = launched["launchPipelineExecution"]["run"]["runId"]
        wait_until(lambda: stage_in_progress(instance, run_id, "pipeline_runs"), 120,
                   "the run to reach pipeline_runs", log)
        # The run worker: the process that started the (in-process) lifecycle step.
        [step_start] = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        worker = psutil.Process(step_start.dagster_event.pid)
        handle = stage_details(instance, run_id, "sandbox")["handle"]
        assert processes_of_sandbox(handle["sandbox_id"]) != []

        worker.kill()
        wait_until(lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE,
                   120, "the run to be marked failed", log)
        wait_until(lambda: not processes_of_sandbox(handle["sandbox_id"]), 120,
                   "teardown_after_failure to reap the sandbox", log)

    assert instance.fetch_materializations(RESULTS_ASSET, limit=1).records == []
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


# What the UI's Terminate button sends.
TERMINATE_RUNS = """
mutation($runIds: [String!]!) {
  terminateRuns(runIds: $runIds, terminatePolicy: SAFE_TERMINATE) {
    __typename
    ... on TerminateRunsResult { terminateRunResults { __typename } }
    ... on PythonError { message }
  }
}"""


@pytest.mark.daemon
def test_from_the_ui_terminate_cancels_and_records_and_an_unknown_partition_is_refused(
        tmp_path, dagster_home, instance):
    """The UI's Terminate: the lifecycle is interrupted inside its stage, tears down, records a
    `canceled` result, and the run ends CANCELED. A key added by hand in the partition picker
    for a config the registry lacks: its run fails before any stage, naming the known ones."""
    from tests.support.injection import stage_in_progress
    from tests.support.runs import latest_record, processes_of_sandbox, stage_details

    registry = slow_synced_registry(tmp_path / "reg", dagster_home)
    instance.add_dynamic_partitions("config", ["nope"])  # the UI's "Add a partition"
    log = tmp_path / "daemon.log"
    with webserver(dagster_home, registry, tmp_path / "web.log") as url, \
            daemon(dagster_home, registry, log):
        launched = graphql(url, LAUNCH_RUN, {"params": asset_job_params(LIFECYCLE, "slow|e1")})
        run_id = launched["launchPipelineExecution"]["run"]["runId"]
        unknown = graphql(url, LAUNCH_RUN, {"params": asset_job_params(LIFECYCLE, "nope|e1")})
        unknown_id = unknown["launchPipelineExecution"]["run"]["runId"]
        wait_until(lambda: stage_in_progress(instance, run_id, "pipeline_runs"), 120,
                   "the run to reach pipeline_runs", log)
        handle = stage_details(instance, run_id, "sandbox")["handle"]

        terminated = graphql(url, TERMINATE_RUNS, {"runIds": [run_id]})
        assert terminated["terminateRuns"]["__typename"] == "TerminateRunsResult", terminated
        wait_until(lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELED,
                   120, "the run to end CANCELED", log)
        wait_until(lambda: instance.get_run_by_id(unknown_id).is_finished, 120,
                   "the unknown partition's run to end", log)

    record = latest_record(instance, "slow|e1")
    assert record["status"] == "canceled" and record["run_id"] == run_id
    assert record["error_summary"].startswith("pipeline_runs: interrupted after")
    assert record["stages"]["teardown"]["status"] == "pass"
    assert processes_of_sandbox(handle["sandbox_id"]) == []
    assert instance.get_run_by_id(unknown_id).status == dg.DagsterRunStatus.FAILURE
    [failure] = instance.all_logs(unknown_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    assert "partition nope|e1 refused: config 'nope' is not in the registry at " \
           f"{registry.resolve()} (known: slow)" in \
           failure.dagster_event.step_failure_data.error.message
    assert instance.get_runs(dg.RunsFilter(run_ids=[unknown_id]))[0].tags.get(POOL_TAG) is None
    assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


@pytest.mark.daemon
def test_from_the_ui_terminate_cancels_a_kubernetes_lifecycle_and_deletes_its_namespace(
        tmp_path, dagster_home, instance):
    """The same Terminate on the Kubernetes provider (the emulated API server, its controller
    running the `train` Job for a minute): CANCELED promptly, the namespace deleted and gone from
    the API, the record says cancelled."""
    from tests.support.injection import (
        SETTLE_S,
        emulated_cluster,
        listed_namespaces,
        stage_in_progress,
        write_kubernetes_registry,
    )
    from tests.support.runs import latest_record, stage_details

    with emulated_cluster(tmp_path / "cloud", train_s=60) as kubeconfig:
        registry = write_kubernetes_registry(tmp_path / "reg", kubeconfig)
        subprocess.run([PY, "-m", "mlci_dagster.cli", "sync"],
                       env=service_env(dagster_home, registry), check=True, timeout=120,
                       capture_output=True)
        log = tmp_path / "daemon.log"
        with webserver(dagster_home, registry, tmp_path / "web.log") as url, \
                daemon(dagster_home, registry, log):
            launched = graphql(url, LAUNCH_RUN,
                               {"params": asset_job_params(LIFECYCLE, "inject|e1")})
            run_id = launched["launchPipelineExecution"]["run"]["runId"]
            wait_until(lambda: stage_in_progress(instance, run_id, "pipeline_runs"), 120,
                       "the run to reach pipeline_runs", log)
            assert stage_details(instance, run_id, "sandbox")["handle"]["sandbox_id"]

            terminated = graphql(url, TERMINATE_RUNS, {"runIds": [run_id]})
            assert terminated["terminateRuns"]["__typename"] == "TerminateRunsResult"
            wait_until(lambda: instance.get_run_by_id(run_id).status ==
                       dg.DagsterRunStatus.CANCELED, 120, "the run to end CANCELED", log)

        record = latest_record(instance, "inject|e1")
        assert record["status"] == "canceled" and record["run_id"] == run_id
        assert record["error_summary"].startswith("pipeline_runs: interrupted after")
        assert record["stages"]["pipeline_runs"]["duration_s"] < 30  # not the Job's minute
        assert record["stages"]["teardown"]["status"] == "pass"
        assert listed_namespaces(kubeconfig, run_id, settle_s=SETTLE_S) == []
