"""Reservations on a real Dagster instance, with the harness's clock set to chosen instants of
Monday 2026-03-09 in New York (the day after the change to daylight-saving time): a daytime
hold's up/down cycle, a missed down taken down by the pre-batch guard, a dirty reservation whose
runs the nightly schedule skips while the others go ahead, and the lease of a SIGKILLed run
broken by the janitor. Each schedule is evaluated at its instant as Dagster's scheduler would,
and its run executed on the instance. The local provider runs real processes; the Kubernetes
provider runs against the loopback API emulator (tests/support/kube_wire.py) through the
official client.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
import uuid
from pathlib import Path

import dagster as dg
import psutil
import pytest
import requests
import yaml

from mlci_dagster.common import clock
from mlci_dagster.compat import instance_connection
from mlci_dagster.definitions import build_definitions
from mlci_dagster.providers.janitor import sweep
from mlci_dagster.providers.local import LocalProvider
from mlci_dagster.providers.processes import marked_processes
from mlci_dagster.registry.localtime import WEEKDAYS
from mlci_dagster.reservations.guard import guard
from mlci_dagster.reservations.holds import end_unfinished, hold_down, hold_lease
from mlci_dagster.reservations.leases import LeaseKind, LeaseStore
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.sensors.cleanup import sandbox_janitor
from mlci_dagster.vocabulary import POOL_TAG
from tests.support.dagster_services import (
    LAUNCH_RUN,
    daemon,
    graphql,
    service_env,
    start_sensor,
    wait_until,
    webserver,
)
from tests.support.injection import listed_namespaces
from tests.support.registries import PY, command_pipeline, config, http_service, write_registry
from tests.support.reservations import (
    RESERVATION,
    execute,
    latest_check,
    latest_hold,
    leases,
    new_york,
    reserve,
    reserved_registry,
    set_clock,
    tick,
)
from tests.support.runs import latest_record, stage_details
from tests.test_cleanup import (  # noqa: F401
    a_port_kept_busy,
    kill_with_workers,
    lifecycle_in_pipeline_runs,
    start_mlci_run,
    start_sandbox,
)
from tests.test_launch_paths import LIFECYCLE, asset_job_params

MORNING = new_york(2026, 3, 9, 8, 0)
EVENING = new_york(2026, 3, 9, 19, 0)
NIGHT = new_york(2026, 3, 9, 22, 0)  # 02:00 UTC: the nightly batch


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """Whatever a test sets the clock to, it is the system's again afterwards."""
    monkeypatch.setenv(clock.OFFSET_ENV, "0")


@pytest.fixture(autouse=True)
def nothing_left(dagster_home):
    """A hold a test left up (or a sandbox a failed assertion left) goes with the test."""
    yield
    sweep(LocalProvider(dagster_home / "mlci"), run_over=lambda _: True,
          teardown_timeout=lambda _: 60)


def sandbox_gone(provider: str, registry: Path, run_id: str, sandbox_id: str) -> bool:
    """Counted where the sandbox lives: its processes here, or its namespace in the API."""
    if provider == "kubernetes":
        sandbox = yaml.safe_load((registry / "configs" / "inject.yaml").read_text())["sandbox"]
        return listed_namespaces(Path(sandbox["cluster"]["kubeconfig"]), run_id,
                                 settle_s=30) == []
    return marked_processes("MLCI_SANDBOX_ID", sandbox_id) == []


def with_free_config(registry: Path) -> None:
    """Config `free` beside `inject`: the same, bound to no reservation."""
    free = yaml.safe_load((registry / "configs" / "inject.yaml").read_text())
    free["name"] = "free"
    del free["sandbox"]["reservation"]
    (registry / "configs" / "free.yaml").write_text(yaml.safe_dump(free))


def hold_up_at_eight(registry, instance) -> dict:
    [request], _ = tick(registry, instance, "hold_up_gpu_box", MORNING)
    assert request.partition_key == RESERVATION
    assert request.run_key == "hold_up:gpu-box:2026-03-09"
    result = execute(registry, instance, "hold_up", request)
    assert result.success, result.get_step_failure_events()
    return latest_hold(instance)


@pytest.mark.parametrize("provider", ["local", "kubernetes"])
def test_a_daytime_hold_goes_up_at_eight_and_down_at_seven_with_no_result(
        provider, tmp_path, instance):
    with reserved_registry(provider, tmp_path) as registry:
        up = hold_up_at_eight(registry, instance)

        assert (up["state"], up["partition"], up["due_down"]) == (
            "up", "inject|e1", "2026-03-09 19:00 EDT")
        assert up["by"] == "schedule hold_up_gpu_box"
        [lease] = leases(instance)
        assert (lease.kind, lease.partition, lease.holder) == (
            LeaseKind.HOLD, "inject|e1", up["holder_run"])
        assert lease.expires_at == EVENING.timestamp()
        # People reach it after its run ended: the run's own cleanup kept it.
        assert instance.get_run_by_id(up["holder_run"]).status == dg.DagsterRunStatus.SUCCESS
        if provider == "local":
            assert requests.get(up["endpoint_web"], timeout=10).status_code == 200
        # The janitor keeps it too, at noon.
        tick(registry, instance, "nightly", new_york(2026, 3, 9, 12, 0))  # moves the clock
        with dg.build_sensor_context(instance=instance,
                                     resources=build_definitions(registry).resources) as ctx:
            kept = sandbox_janitor(ctx)
        assert isinstance(kept, dg.SkipReason), kept
        assert not sandbox_gone(provider, registry, up["holder_run"], up["sandbox_id"])

        [request], _ = tick(registry, instance, "hold_down_gpu_box", EVENING)
        result = execute(registry, instance, "hold_down", request)

        assert result.success
        down = latest_hold(instance)
        assert (down["state"], down["by"], down["sandbox_id"]) == (
            "down", "schedule hold_down_gpu_box", up["sandbox_id"])
        assert leases(instance) == []
        assert sandbox_gone(provider, registry, up["holder_run"], up["sandbox_id"])
        # A hold is no test: no results, so nothing for the history.
        assert latest_record(instance, "inject|e1") is None


def test_the_janitor_takes_a_hold_down_only_past_its_down_time_and_grace(tmp_path, instance):
    with reserved_registry("local", tmp_path) as registry:
        up = hold_up_at_eight(registry, instance)
        resources = build_definitions(registry).resources

        def janitor_at(moment) -> object:
            set_clock(moment)
            with dg.build_sensor_context(instance=instance, resources=resources) as context:
                return sandbox_janitor(context)

        early = janitor_at(new_york(2026, 3, 9, 19, 5))  # the evening's run may be coming
        assert isinstance(early, dg.SkipReason) and leases(instance)
        late = janitor_at(new_york(2026, 3, 9, 19, 11))

        held = [e for e in late.asset_events if isinstance(e, dg.AssetMaterialization)]
        [evaluation] = [e for e in late.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
        assert [(e.partition, e.metadata["state"].value, e.metadata["by"].value)
                for e in held] == [(RESERVATION, "down", "janitor")]
        assert evaluation.passed and evaluation.metadata["actions"].value
        assert leases(instance) == []
        assert sandbox_gone("local", registry, up["holder_run"], up["sandbox_id"])


def test_a_run_that_finds_its_reservation_held_whole_is_refused_not_run(tmp_path, instance):
    """Runs wait for a slot in Dagster's queue; one started outside it (here in process)
    while the hold takes the only slot fails closed: skip, with who holds the slot."""
    with reserved_registry("local", tmp_path) as registry:
        up = hold_up_at_eight(registry, instance)
        instance.add_dynamic_partitions("config", ["inject"])

        result = execute(registry, instance, "lifecycle",
                         dg.RunRequest(partition_key="inject|e1"))

        record = latest_record(instance, "inject|e1")
        assert record["status"] == "skip"
        assert record["error_summary"].startswith(
            f"reservation gpu-box is full: its 1 slot(s) are leased (hold {up['holder_run'][:8]}"
            " (inject|e1))")
        assert result.success  # a skip is no failure
        assert [lease.kind for lease in leases(instance)] == [LeaseKind.HOLD]
        # The skip has no image digest, beside the hold's records that have one: every view
        # of the history still renders.
        grid = tmp_path / "grid"
        report = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry),
                                 "report", "--html", str(grid)], capture_output=True, text=True,
                                env=os.environ, timeout=120)
        assert report.returncode == 0, report.stderr
        assert "inject|e1: skip: reservation gpu-box is full" in report.stdout
        assert "nan" not in (grid / "grid.html").read_text().lower()


def mlci_run(registry: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mlci run` at the harness's clock (its offset is in the environment it inherits)."""
    return subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry), "run",
                           *args], capture_output=True, text=True, env=os.environ, timeout=300)


def test_mlci_run_takes_a_missed_down_down_first_as_the_nightly_does(tmp_path, instance):
    """A hold whose down time passed with no hold_down run (the daemon was off) used to keep
    `mlci run` waiting for its pool forever; the pre-batch guard takes it down first."""
    with reserved_registry("local", tmp_path) as registry:
        instance.add_dynamic_partitions("config", ["inject"])
        up = hold_up_at_eight(registry, instance)
        set_clock(NIGHT)

        done = mlci_run(registry)

        assert done.returncode == 0, done.stdout + done.stderr
        assert (f"reservation gpu-box: tore down the daytime deployment inject|e1 "
                f"({up['sandbox_id']}), held past its down time 2026-03-09 19:00 EDT") \
            in done.stdout
        assert "inject|e1: passed" in done.stdout
        assert (latest_hold(instance)["state"], latest_hold(instance)["by"]) == \
            ("down", "pre-batch guard")
        assert latest_check(instance).passed
        assert sandbox_gone("local", registry, up["holder_run"], up["sandbox_id"])
        assert leases(instance) == []


def test_mlci_run_skips_a_reservation_still_held_and_runs_the_rest(tmp_path, instance):
    """At noon the daytime deployment is up: its reservation's partitions are skipped with
    the reason, at once, and another config's run goes ahead; a skip is no failure."""
    with reserved_registry("local", tmp_path) as registry:
        with_free_config(registry)
        instance.add_dynamic_partitions("config", ["inject", "free"])
        up = hold_up_at_eight(registry, instance)
        set_clock(new_york(2026, 3, 9, 12, 0))

        done = mlci_run(registry)

        assert done.returncode == 0, done.stdout + done.stderr
        assert (f"inject|e1: SKIPPED: reservation gpu-box: still held: the daytime deployment "
                f"inject|e1 of run {up['holder_run'][:8]} is up until 2026-03-09 19:00 EDT") \
            in done.stdout
        assert "free|e1: passed" in done.stdout
        assert "PARTITION" in done.stdout  # the report was printed
        assert [r.tags["dagster/partition"] for r in instance.get_runs()
                if r.job_name == "lifecycle"] == ["free|e1"]
        assert not latest_check(instance).passed
        assert [lease.kind for lease in leases(instance)] == [LeaseKind.HOLD]


@pytest.mark.parametrize("provider", ["local", "kubernetes"])
def test_a_missed_down_is_taken_down_by_the_pre_batch_guard_and_recorded(
        provider, tmp_path, instance):
    with reserved_registry(provider, tmp_path) as registry:
        instance.add_dynamic_partitions("config", ["inject"])
        up = hold_up_at_eight(registry, instance)
        # 19:00 passes with no hold_down run (the daemon was down, say).

        requests_, skipped = tick(registry, instance, "nightly", NIGHT)

        assert [str(r.partition_key) for r in requests_] == ["inject|e1"], skipped
        down = latest_hold(instance)
        assert (down["state"], down["by"]) == ("down", "pre-batch guard")
        assert down["note"] == ("held past its down time 2026-03-09 19:00 EDT: torn down by the "
                                "pre-batch guard")
        check = latest_check(instance)
        assert check.passed
        assert check.metadata["actions"].value == [
            f"tore down the daytime deployment inject|e1 ({up['sandbox_id']}), held past its "
            "down time 2026-03-09 19:00 EDT"]
        assert leases(instance) == []
        assert sandbox_gone(provider, registry, up["holder_run"], up["sandbox_id"])


def test_a_reservation_still_held_at_the_batch_is_refused_and_the_others_run(
        tmp_path, instance):
    """A hold being stood up at 22:00 by a run still in progress is not dead: the guard cannot
    clear it, so the reservation's runs are skipped with the reason and another config's run
    goes ahead."""
    with reserved_registry("local", tmp_path) as registry:
        with_free_config(registry)
        instance.add_dynamic_partitions("config", ["inject", "free"])
        # Created and not finished: in progress, as far as anyone can tell.
        in_progress = instance.create_run_for_job(
            build_definitions(registry).resolve_job_def("hold_up"), run_id=str(uuid.uuid4()),
            tags={"dagster/partition": RESERVATION})
        store = LeaseStore(lambda: instance_connection(instance))
        store.acquire(RESERVATION, 1, kind=LeaseKind.HOLD, holder=in_progress.run_id,
                      partition="inject|e1", now=NIGHT.timestamp() - 5,
                      expires_at=NIGHT.timestamp() + 3600, detail={"state": "starting"})

        runs, _ = tick(registry, instance, "nightly", NIGHT)

        assert [str(r.partition_key) for r in runs] == ["free|e1"]
        check = latest_check(instance)
        assert not check.passed
        assert check.description == (
            f"dirty: still held: the daytime deployment inject|e1 of run "
            f"{in_progress.run_id[:8]} is up until 2026-03-09 23:00 EDT")
        assert [lease.holder for lease in leases(instance)] == [in_progress.run_id]


def test_a_hold_still_held_past_its_down_time_is_said_to_be_overdue(tmp_path, instance):
    """At 22:00 a hold due down at 19:00 is still held (the run standing it up is still in
    progress): the guard says when it was due, never that it "is up until" a time gone by."""
    with reserved_registry("local", tmp_path) as registry:
        in_progress = instance.create_run_for_job(
            build_definitions(registry).resolve_job_def("hold_up"), run_id=str(uuid.uuid4()),
            tags={"dagster/partition": RESERVATION})
        store = LeaseStore(lambda: instance_connection(instance))
        store.acquire(RESERVATION, 1, kind=LeaseKind.HOLD, holder=in_progress.run_id,
                      partition="inject|e1", now=MORNING.timestamp(),
                      expires_at=EVENING.timestamp(), detail={"state": "starting"})
        set_clock(NIGHT)

        report = guard(MlciResource(registry_path=str(registry)).reservations(instance),
                       RESERVATION, batch=True)

    assert report.problems == [
        f"still held: the daytime deployment inject|e1 of run {in_progress.run_id[:8]} was "
        "due down at 2026-03-09 19:00 EDT, 3h ago"]


def test_what_a_hold_s_take_down_left_is_said_in_words(tmp_path, instance, dagster_home):
    """A hold's down and the end of an unfinished hold both say what their destroy left (here a
    port still in use), never the provider's raw report nor nothing at all."""
    with reserved_registry("local", tmp_path) as registry:
        rctx = MlciResource(registry_path=str(registry)).reservations(instance)
        provider = LocalProvider(dagster_home / "mlci")
        store = LeaseStore(lambda: instance_connection(instance))
        said = {}
        for state in ("up", "starting"):  # a hold up; one whose run ended before it was up
            holder = f"hold-{state}"
            handle = start_sandbox(provider, registry, holder, config="inject")
            store.acquire(RESERVATION, 1, kind=LeaseKind.HOLD, holder=holder,
                          partition="inject|e1", now=clock.now(), expires_at=clock.now() + 3600,
                          detail={"state": state, "sandbox_id": handle.sandbox_id})
            with a_port_kept_busy(provider, handle) as port:
                if state == "up":
                    said[state] = hold_down(rctx, RESERVATION, by="test").problems
                else:
                    said[state] = end_unfinished(rctx, hold_lease(rctx, RESERVATION))
            store.take_back(hold_lease(rctx, RESERVATION))
            said[state] = (said[state], handle.sandbox_id, port)

    for state in ("up", "starting"):
        problems, sandbox_id, port = said[state]
        assert problems == [f"sandbox {sandbox_id} not fully destroyed: ports still in use: "
                            f"{port}"], state


@pytest.mark.parametrize("provider", ["local",
                                      pytest.param("kubernetes", marks=pytest.mark.slow)])
def test_the_lease_of_a_sigkilled_run_is_broken_by_the_janitor(
        provider, dagster_home, instance, tmp_path, start_mlci_run):  # noqa: F811
    with reserved_registry(provider, tmp_path, pipeline_s=30) as registry:
        mlci = start_mlci_run(registry, tmp_path / "run.log")
        run = lifecycle_in_pipeline_runs(instance)
        [lease] = leases(instance)
        assert (lease.kind, lease.holder) == (LeaseKind.RUN, run.run_id)
        sandbox_id = stage_details(instance, run.run_id, "sandbox")["handle"]["sandbox_id"]

        kill_with_workers(mlci)  # the run's worker and mlci run at once
        assert [lease.holder for lease in leases(instance)] == [run.run_id]  # left held
        assert not sandbox_gone(provider, registry, run.run_id, sandbox_id)
        janitor = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry),
                                  "janitor"], capture_output=True, text=True, env=os.environ,
                                 timeout=180)

        assert janitor.returncode == 0, janitor.stdout + janitor.stderr
        assert (f"reservation gpu-box: broke the lease of run {run.run_id[:8]} on slot 0 "
                f"(inject|e1): run {run.run_id[:8]} is over") in janitor.stdout
        assert leases(instance) == []
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert sandbox_gone(provider, registry, run.run_id, sandbox_id)
        assert list((dagster_home / "mlci" / "ledger").glob("*.json")) == []
        assert not [p for p in psutil.process_iter(["cmdline"])
                    if str(registry) in " ".join(p.info["cmdline"] or [])]
        check = latest_check(instance)
        assert check.passed and "broke the lease" in check.metadata["actions"].value[0]


def hold_params(job: str) -> dict:
    """What the UI's Launch button sends for a hold job of gpu-box (its launchpad's default
    config)."""
    action = "up" if job == "hold_up" else "down"
    return {"mode": "default",
            "runConfigData": {"ops": {"held_sandbox": {"config": {"action": action}}}},
            "selector": {"repositoryLocationName": "mlci_dagster.definitions",
                         "repositoryName": "__repository__", "pipelineName": job},
            "executionMetadata": {"tags": [{"key": "dagster/partition",
                                            "value": RESERVATION}]}}


@pytest.mark.daemon
def test_on_capacity_one_the_second_batch_and_a_run_during_a_hold_wait_in_dagsters_queue(
        tmp_path, dagster_home, instance):
    """A real daemon and webserver. The stale scanner, turned on, asks for both untested
    partitions of the reservation at once: one waits for the other. Then the UI stands the hold
    up, and a run launched meanwhile stays queued (the limit is the capacity less the hold)
    until the UI takes the hold down."""
    # Quick lifecycles: a prebuilt image, a 2 s pipeline; `inject` (the intent) serves HTTP.
    quick = command_pipeline("train", "import time; time.sleep(2)")
    registry = write_registry(tmp_path / "reg", [
        config(name, tiers=["pr"], pipelines=[quick],  # off the nightly schedule
               sandbox={"services": [http_service()] if name == "inject" else []},
               ui_smoke={"routes": []}) for name in ("inject", "second")],
        engines={"e1": {}})
    # The hold's own schedules fire on a weekday three days away: not during this test.
    reserve(registry, "local", weekdays=[WEEKDAYS[(dt.date.today().weekday() + 3) % 7]])
    body = yaml.safe_load((registry / "configs" / "second.yaml").read_text())
    body["sandbox"]["reservation"] = RESERVATION
    (registry / "configs" / "second.yaml").write_text(yaml.safe_dump(body))
    env = service_env(dagster_home, registry)
    sync = subprocess.run([PY, "-m", "mlci_dagster.cli", "sync"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert "pool limits: gpu-box=1" in sync.stdout, sync.stdout + sync.stderr
    start_sensor(dagster_home, registry, "stale_scanner")  # off by default

    def lifecycle_runs() -> list[dg.DagsterRun]:
        return [r for r in instance.get_runs() if r.job_name in ("lifecycle", "__ASSET_JOB")
                and "|" in r.tags.get("dagster/partition", "")]

    log = tmp_path / "daemon.log"
    most, queued_behind = 0, False
    with webserver(dagster_home, registry, tmp_path / "web.log") as url, \
            daemon(dagster_home, registry, log):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = lifecycle_runs()
            running = [r for r in runs if r.status in (dg.DagsterRunStatus.STARTING,
                                                       dg.DagsterRunStatus.STARTED)]
            most = max(most, len(running))
            queued_behind |= bool(running) and any(
                r.status == dg.DagsterRunStatus.QUEUED for r in runs)
            if len(runs) == 2 and all(r.is_finished for r in runs):
                break
            time.sleep(0.2)
        batch = lifecycle_runs()

        up = graphql(url, LAUNCH_RUN, {"params": hold_params("hold_up")})
        assert up["launchPipelineExecution"]["__typename"] == "LaunchRunSuccess", up
        wait_until(lambda: leases(instance) and leases(instance)[0].detail.get("state")
                   == "up", 120, "the hold to be up", log)
        during = graphql(url, LAUNCH_RUN, {"params": asset_job_params(LIFECYCLE,
                                                                      "second|e1")})
        run_id = during["launchPipelineExecution"]["run"]["runId"]
        time.sleep(10)  # several dequeue passes
        waiting = instance.get_run_by_id(run_id).status

        down = graphql(url, LAUNCH_RUN, {"params": hold_params("hold_down")})
        assert down["launchPipelineExecution"]["__typename"] == "LaunchRunSuccess", down
        wait_until(lambda: instance.get_run_by_id(run_id).is_finished, 180,
                   "the queued run to run once the hold is down", log)
        hold_runs = {r.job_name: r for r in instance.get_runs()
                     if r.job_name in ("hold_up", "hold_down")}

    assert sorted(r.tags["dagster/partition"] for r in batch) == ["inject|e1", "second|e1"]
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in batch)
    assert (most, queued_behind) == (1, True)
    assert waiting == dg.DagsterRunStatus.QUEUED
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    assert hold_runs["hold_up"].tags.get(POOL_TAG) == RESERVATION  # waits like a run
    assert POOL_TAG not in hold_runs["hold_down"].tags  # never waits: it frees the slot
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in hold_runs.values())
    up_record = instance.get_run_record_by_id(hold_runs["hold_down"].run_id)
    assert instance.get_run_record_by_id(run_id).start_time >= up_record.end_time
    assert leases(instance) == []
