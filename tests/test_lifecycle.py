"""The lifecycle on a real Dagster instance, with real processes and real HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from mlci_dagster.paths import LOCAL_EXAMPLE
from tests.support.registries import (
    PY,
    command_pipeline,
    config,
    http_service,
    leaky_registry,
    write_registry,
)
from tests.support.runs import assert_no_leaks, processes_of_sandbox, run_partition, stage_details


def check_results(instance: dg.DagsterInstance, run_id: str) -> dict[str, bool]:
    """Every asset check evaluated in a run: '<asset>.<check>' -> passed."""
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {
        f"{r.dagster_event.event_specific_data.asset_key.to_user_string()}."
        f"{r.dagster_event.event_specific_data.check_name}":
        r.dagster_event.event_specific_data.passed
        for r in records
    }


def test_example_partition_passes_and_records_every_stage(instance, dagster_home):
    result, record = run_partition(instance, LOCAL_EXAMPLE, "jobs-api|sqlite")

    assert result.success
    assert record["status"] == "pass"
    assert {s: v["status"] for s, v in record["stages"].items()} == {
        "image": "pass", "sandbox": "pass", "pipeline_runs": "pass", "ui_smoke": "pass",
        "teardown": "pass"}
    assert record["image_digest"].startswith("sha256:")
    assert record["trigger"] == "manual"
    assert len(record["config_id"]) == 16
    assert all(check_results(instance, result.run_id).values())
    assert_no_leaks(dagster_home, stage_details(instance, result.run_id, "sandbox")["handle"])


def test_failing_pipeline_skips_ui_tears_down_and_fails_the_run(instance, dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config(
        "broken", pipelines=[command_pipeline(
            "train", "import sys; print('loss diverged', file=sys.stderr); sys.exit(3)")])])

    result, record = run_partition(instance, registry, "broken|e1")

    assert not result.success  # the run is red ...
    assert record is not None  # ... and the record is kept
    assert record["status"] == "fail-pipeline_runs"
    assert record["failure_kind"] == "product"
    assert record["owner"] == "test-team"
    assert "loss diverged" in record["error_summary"]
    assert "exited 3" in record["error_summary"]
    assert record["stages"]["ui_smoke"]["status"] == "skip"
    assert record["stages"]["teardown"]["status"] == "pass"
    checks = check_results(instance, result.run_id)
    assert checks["pipeline_runs.stage_passed"] is False
    assert checks["results.lifecycle_passed"] is False
    assert_no_leaks(dagster_home, stage_details(instance, result.run_id, "sandbox")["handle"])


def test_service_never_ready_fails_sandbox_and_kills_partial_services(
    instance, dagster_home, tmp_path
):
    never_ready = {"name": "api", "command": [PY, "-c", "import time; time.sleep(600)"],
                   "ready": {"tcp": True, "timeout_s": 2}}
    registry = write_registry(tmp_path / "reg", [config(
        "stuck", sandbox={"services": [http_service("web"), never_ready]},
        ui_smoke={"routes": []})])

    result, record = run_partition(instance, registry, "stuck|e1")

    assert not result.success
    assert record["status"] == "fail-sandbox"
    assert record["failure_kind"] == "timeout"
    assert "service 'api' not ready in time" in record["error_summary"]
    assert [record["stages"][s]["status"] for s in ("pipeline_runs", "ui_smoke")] == ["skip"] * 2
    handle = stage_details(instance, result.run_id, "sandbox")["handle"]
    assert set(handle["process_groups"]) == {"service:web", "service:api"}
    assert_no_leaks(dagster_home, handle)


def test_service_that_exits_fails_sandbox_with_its_log_tail(instance, dagster_home, tmp_path):
    crashing = {"name": "api", "command": [PY, "-c", "raise SystemExit('bad flag --foo')"],
                "ready": {"tcp": True, "timeout_s": 20}}
    registry = write_registry(tmp_path / "reg", [config(
        "crash", sandbox={"services": [crashing]}, ui_smoke={"routes": []})])

    result, record = run_partition(instance, registry, "crash|e1")

    assert record["status"] == "fail-sandbox"
    assert record["failure_kind"] == "product"
    assert "exited before ready" in record["error_summary"]
    assert "bad flag --foo" in record["error_summary"]
    assert record["error_summary"].count("bad flag --foo") == 1  # the log tail, once
    assert record["stages"]["sandbox"]["duration_s"] < 15  # did not wait for the probe timeout


def test_hanging_pipeline_is_killed_at_its_timeout(instance, dagster_home, tmp_path):
    # The pipeline forks a grandchild too: the whole process group must die.
    hang = command_pipeline(
        "hang", "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)",
        timeout_s=2)
    registry = write_registry(tmp_path / "reg", [config("hangs", pipelines=[hang])])

    result, record = run_partition(instance, registry, "hangs|e1")

    assert record["status"] == "fail-pipeline_runs"
    assert record["failure_kind"] == "timeout"
    assert "killed at its timeout of 2s" in record["error_summary"]
    assert record["stages"]["pipeline_runs"]["duration_s"] < 10
    assert_no_leaks(dagster_home, stage_details(instance, result.run_id, "sandbox")["handle"])


def test_image_failure_skips_everything_and_needs_no_teardown(instance, dagster_home, tmp_path):
    image = {"build": {"command": [PY, "-c", "raise SystemExit(2)"], "inputs": ["mlci.yaml"]}}
    registry = write_registry(tmp_path / "reg", [config("noimage", image=image)])

    result, record = run_partition(instance, registry, "noimage|e1")

    assert record["status"] == "fail-image"
    assert [v["status"] for v in record["stages"].values()] == ["fail"] + ["skip"] * 4


def test_image_build_is_cached_by_content_hash(instance, dagster_home, tmp_path):
    counter = tmp_path / "builds"
    build = [PY, "-c", f"open({str(counter)!r}, 'a').write('x')"]
    registry = write_registry(
        tmp_path / "reg", [config("cached", image={"build": {"command": build,
                                                             "inputs": ["inputs/*"]}})])
    (registry / "inputs").mkdir()
    (registry / "inputs" / "requirements.txt").write_text("numpy==2.0\n")

    first = run_partition(instance, registry, "cached|e1")[1]
    second = run_partition(instance, registry, "cached|e1")[1]
    (registry / "inputs" / "requirements.txt").write_text("numpy==2.1\n")
    third = run_partition(instance, registry, "cached|e1")[1]

    assert counter.read_text() == "xx"  # built, reused, rebuilt after the input changed
    assert first["image_digest"] == second["image_digest"] != third["image_digest"]


def test_planted_secret_never_reaches_metadata_logs_or_summaries(
    instance, dagster_home, tmp_path, monkeypatch
):
    secret = "tok-9f8e7d6c5b4a"
    monkeypatch.setenv("MLCI_TEST_TOKEN", secret)
    registry = leaky_registry(tmp_path / "reg")

    result, record = run_partition(instance, registry, "leaky|e1")

    assert record["status"] == "fail-pipeline_runs"
    assert "auth ***" in record["error_summary"]  # the line is kept, the value is not
    service_log = Path(stage_details(instance, result.run_id, "sandbox")["handle"]["log_dir"],
                       "service-web.log")
    assert "token is ***" in service_log.read_text()
    # Nothing under DAGSTER_HOME holds it: event log, metadata, stored outputs, logs, records.
    leaks = [p for p in dagster_home.rglob("*")
             if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert all(secret not in str(e) for e in instance.all_logs(result.run_id))


def test_two_partitions_side_by_side_share_no_port_or_directory(dagster_home, tmp_path):
    import subprocess

    # Long enough that the second worker (which starts once the first run is in progress, and
    # imports Dagster first) has its sandbox up before the first one's teardown, under load.
    slow = command_pipeline("work", "import time; time.sleep(8)")
    registry = write_registry(tmp_path / "reg", [config("left", pipelines=[slow]),
                                                 config("right", pipelines=[slow])])
    done = subprocess.run(
        [PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run", "--parallel", "2"],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    with dg.DagsterInstance.get() as instance:
        sandboxes = [
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("sandbox"), asset_partitions=[key])
            for key in ("left|e1", "right|e1")
        ]
        handles, windows = [], []
        for records_filter in sandboxes:
            record = instance.fetch_materializations(records_filter, limit=1).records[0]
            details = record.asset_materialization.metadata["details"].value
            handles.append(details["handle"])
            teardown = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("teardown"),
                                      asset_partitions=records_filter.asset_partitions), limit=1,
            ).records[0]
            windows.append((details["handle"]["created_at"], teardown.timestamp))

    assert max(start for start, _ in windows) < min(end for _, end in windows)  # overlapped
    assert set(handles[0]["ports"].values()).isdisjoint(handles[1]["ports"].values())
    assert handles[0]["workdir"] != handles[1]["workdir"]
    for handle in handles:
        assert_no_leaks(dagster_home, handle)
        assert processes_of_sandbox(handle["sandbox_id"]) == []


def test_engine_service_starts_first_and_its_port_reaches_the_pipeline(
    instance, dagster_home, tmp_path
):
    engines = {"e1": {"services": [http_service("store")],
                      "variables": {"STORE_URL": "${services.store.url}"}}}
    probe = command_pipeline(
        "uses-store", "import os, urllib.request; "
        "print(urllib.request.urlopen(os.environ['STORE_URL']).status)",
        expect_output=["200"])
    registry = write_registry(tmp_path / "reg", [config("with-db", pipelines=[probe])],
                              engines=engines)

    result, record = run_partition(instance, registry, "with-db|e1")

    assert record["status"] == "pass", record["error_summary"]
    handle = stage_details(instance, result.run_id, "sandbox")["handle"]
    assert list(handle["process_groups"]) == ["service:store", "service:web"]
    assert_no_leaks(dagster_home, handle)


def test_command_probe_sees_its_rendered_port(instance, dagster_home, tmp_path):
    web = http_service()
    web["ready"] = {"command": [PY, "-c", "import socket, sys; "
                                "socket.create_connection(('127.0.0.1', int(sys.argv[1])))",
                                "${port}"], "timeout_s": 20}
    registry = write_registry(tmp_path / "reg", [config("probed", sandbox={"services": [web]})])

    result, record = run_partition(instance, registry, "probed|e1")

    assert record["status"] == "pass", record["error_summary"]
    [probe] = stage_details(instance, result.run_id, "sandbox")["probes"]
    assert probe["kind"] == "command" and probe["ready"]


def test_probe_that_cannot_render_fails_the_sandbox_and_teardown_stops_its_services(
        instance, dagster_home, tmp_path, monkeypatch):
    monkeypatch.delenv("MLCI_UNSET_VARIABLE", raising=False)
    web = http_service()
    web["ready"] = {"command": [PY, "-c", "pass", "${env.MLCI_UNSET_VARIABLE}"], "timeout_s": 20}
    registry = write_registry(tmp_path / "reg", [config("unrendered",
                                                        sandbox={"services": [web]})])

    result, record = run_partition(instance, registry, "unrendered|e1")

    assert record["status"] == "fail-sandbox"
    assert record["failure_kind"] == "config"  # the test names a variable this run lacks
    assert "MLCI_UNSET_VARIABLE" in record["error_summary"]
    assert record["stages"]["teardown"]["status"] == "pass"
    assert_no_leaks(dagster_home, stage_details(instance, result.run_id, "sandbox")["handle"])


def test_teardown_finds_the_runs_sandboxes_in_the_ledger_without_a_handle(dagster_home, tmp_path):
    from mlci_dagster.registry import load_registry
    from mlci_dagster.stages.context import LifecycleContext
    from mlci_dagster.stages.outcome import StageClock
    from mlci_dagster.stages.teardown import tear_down
    from mlci_dagster.vocabulary import FailureKind, Stage

    registry = load_registry(write_registry(tmp_path / "reg", [config("lost")]))
    ctx = LifecycleContext.create(registry, "lost", "e1", "run-1", dagster_home / "mlci")
    spec = ctx.sandbox_spec
    handle = ctx.provider.create(spec, config="lost", engine="e1", run_id="run-1",
                                 engine_variables={}, teardown_s=60)
    other = ctx.provider.create(spec, config="lost", engine="e1", run_id="run-2",
                                engine_variables={}, teardown_s=60)
    # What a sandbox stage that crashed half-way records: a failure, and no handle.
    crashed = StageClock(Stage.SANDBOX).failed(FailureKind.INFRA, "harness error")

    outcome = tear_down(ctx, [crashed])

    assert outcome.passed, outcome.error_summary
    assert [s.sandbox_id for s in outcome.details.sandboxes] == [handle.sandbox_id]
    assert processes_of_sandbox(handle.sandbox_id) == []
    assert [h.sandbox_id for h in ctx.provider.list_live()] == [other.sandbox_id]  # not ours
    ctx.provider.destroy(other, timeout_s=60)


def test_harness_error_summary_is_redacted(dagster_home, tmp_path, monkeypatch):
    from mlci_dagster.registry import load_registry
    from mlci_dagster.stages.context import LifecycleContext
    from mlci_dagster.stages.lifecycle import guarded
    from mlci_dagster.vocabulary import Stage

    secret = "tok-5e6f7a8b9c0d"
    monkeypatch.setenv("MLCI_TEST_TOKEN", secret)
    registry = load_registry(leaky_registry(tmp_path / "reg"))
    ctx = LifecycleContext.create(registry, "leaky", "e1", "run-1", dagster_home / "mlci")

    def buggy():
        raise RuntimeError(f"could not parse {os.environ['MLCI_TEST_TOKEN']}")

    outcome = guarded(ctx, Stage.PIPELINE_RUNS, buggy)

    assert outcome.failure_kind == "infra"
    assert "harness error" in outcome.error_summary and "RuntimeError" in outcome.error_summary
    assert secret not in outcome.error_summary and "could not parse ***" in outcome.error_summary


@pytest.mark.parametrize(("key", "problem"), [
    ("nope|e1", "config 'nope' is not in the registry at {root} (known: only-e1)"),
    ("only-e1|e2", "engine 'e2' does not apply to config 'only-e1' (expected one of: e1)"),
])
def test_a_partition_the_registry_lacks_is_refused_before_any_stage(
        key, problem, instance, dagster_home, tmp_path):
    """As when a key is added by hand in the UI's partition picker and launched, or the matrix
    offers a cell the config does not apply to: the run fails naming what is wrong, and
    nothing is created or recorded."""
    registry = write_registry(tmp_path / "reg", [config("only-e1", engines=["e1"])],
                              engines={"e1": {}, "e2": {}})

    result, record = run_partition(instance, registry, key)

    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.error.message.strip().endswith(
        f"partition {key} refused: {problem.format(root=registry.resolve())}")
    assert record is None
    assert result.asset_materializations_for_node("run_lifecycle") == []
    assert not (dagster_home / "mlci" / "ledger").exists() or \
        list((dagster_home / "mlci" / "ledger").glob("*.json")) == []


def test_a_pipeline_command_that_does_not_exist_is_the_tests_own_fault_with_a_log(
        instance, dagster_home, tmp_path):
    """Not an outage (infra, left out of the history's rules): a failure of kind `config`,
    counted, owned by the config's owners, pointing at a log and at its debug bundle."""
    from mlci_dagster.event_log import consolidate, new_results
    from mlci_dagster.history.analysis import analyze, signature_clusters
    from mlci_dagster.history.render import failure_notes
    from mlci_dagster.registry.models import HistorySettings

    registry = write_registry(tmp_path / "reg", [config("typo", pipelines=[
        {"kind": "command", "name": "train", "command": ["no-such-command-xyz", "--epochs", "1"],
         "timeout_s": 30}])])

    result, record = run_partition(instance, registry, "typo|e1")

    assert not result.success
    assert (record["status"], record["failure_kind"]) == ("fail-pipeline_runs", "config")
    assert record["error_summary"] == ("pipeline 'train': could not start "
                                       "'no-such-command-xyz': No such file or directory")
    assert "could not start 'no-such-command-xyz'" in Path(record["log_ref"]).read_text()
    assert Path(record["debug_bundle"]).is_file()
    table, _ = consolidate(instance, None)
    [summary] = analyze(table, ["typo|e1"], HistorySettings(), record["finished_at"] + 1)
    assert str(summary.status) == "FAILING"  # counted: not BROKEN, as an outage would be
    assert summary.last["log_ref"] == record["log_ref"]
    assert summary.last["debug_bundle"] == record["debug_bundle"]
    notes = failure_notes([summary], dict((r.partition, r) for _, r in new_results(instance, 0)),
                          signature_clusters(table, [summary]))
    assert "typo|e1: fail-pipeline_runs (config (the test's own setup), owner test-team)" in notes
    assert f"log: {record['log_ref']}" in notes
    assert f"debug bundle: {record['debug_bundle']}" in notes


def test_an_interrupt_during_teardown_waits_until_it_is_done():
    """Teardown holds SIGINT: one that arrives meanwhile is handled right after, not lost."""
    import signal

    from mlci_dagster.stages.lifecycle import signals_held

    finished = False
    # Python's own handler raises once the block is over; the block itself goes on.
    with pytest.raises(KeyboardInterrupt), signals_held(signal.SIGINT):
        os.kill(os.getpid(), signal.SIGINT)
        finished = True
    assert finished
