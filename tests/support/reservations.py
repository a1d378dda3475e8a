"""A reserved machine for the tests and the simulated day: config `inject` (tests/support/
injection.py) on a provider, bound to reservation `gpu-box` (capacity 1, America/New_York,
daytime 08:00-19:00 on weekdays, `inject` its intent); a clock set to a chosen instant for this
process and every process it starts; and schedule ticks evaluated as Dagster's scheduler would at
that instant."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg
import yaml

from mlci_dagster.common import clock
from mlci_dagster.compat import instance_connection
from mlci_dagster.definitions import build_definitions
from mlci_dagster.reservations.leases import Lease, LeaseKind, LeaseStore
from tests.support.injection import registry_on
from tests.support.registries import command_pipeline, config, write_registry

NEW_YORK = ZoneInfo("America/New_York")
RESERVATION = "gpu-box"


def reserve(root: Path, provider: str, capacity: int = 1, **daytime: Any) -> Path:
    """Binds the registry's `inject` to `gpu-box`, whose daytime intent it is."""
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    settings["reservations"] = [{
        "name": RESERVATION, "provider": provider, "capacity": capacity,
        "timezone": "America/New_York",
        "daytime": {"intent": "inject", "up": "08:00", "down": "19:00", **daytime}}]
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings))
    path = root / "configs" / "inject.yaml"
    body = yaml.safe_load(path.read_text())
    body["sandbox"]["reservation"] = RESERVATION
    path.write_text(yaml.safe_dump(body))
    return root


def quick_registry(root: Path, pipeline_s: float) -> Path:
    """Config `inject` on the local provider, quick: a prebuilt image, a web service, one
    pipeline of `pipeline_s` seconds."""
    pipeline = command_pipeline("train", f"import time; time.sleep({pipeline_s})",
                                timeout_s=max(30.0, pipeline_s + 30))
    return write_registry(root, [config("inject", pipelines=[pipeline],
                                        ui_smoke={"routes": []})], engines={"e1": {}})


@contextlib.contextmanager
def reserved_registry(provider: str, tmp: Path, capacity: int = 1, pipeline_s: float = 1.0
                      ) -> Iterator[Path]:
    """`inject` bound to gpu-box: on the local provider a quick one (see quick_registry); on
    another, tests/support/injection.py's, its emulated API running until the exit."""
    if provider == "local":
        yield reserve(quick_registry(tmp / "registry", pipeline_s), provider, capacity)
        return
    with registry_on(provider, tmp) as root:
        yield reserve(root, provider, capacity)


def new_york(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=NEW_YORK)


def set_clock(moment: dt.datetime) -> None:
    """The harness's clock reads `moment` now, here and in every process started after."""
    os.environ[clock.OFFSET_ENV] = clock.offset_to(moment.timestamp())


def leases(instance: dg.DagsterInstance) -> list[Lease]:
    return LeaseStore(lambda: instance_connection(instance)).leases()


def race_for_slots(instance: dg.DagsterInstance, reservation: str, capacity: int,
                   racers: int) -> list[int]:
    """The slots won when `racers` threads, each with connections of its own, ask for one of
    the reservation's `capacity` slots at once."""
    LeaseStore(lambda: instance_connection(instance)).leases()  # the table exists first
    won: list[int] = []
    barrier = threading.Barrier(racers)

    def take(i: int) -> None:
        barrier.wait()
        lease = LeaseStore(lambda: instance_connection(instance)).acquire(
            reservation, capacity, kind=LeaseKind.RUN, holder=f"racer-{i}", partition="a|e",
            now=1, expires_at=2)
        if lease is not None:
            won.append(lease.slot)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(won)


def tick(registry: Path, instance: dg.DagsterInstance, schedule: str, at: dt.datetime
         ) -> tuple[list[dg.RunRequest], str | None]:
    """The schedule's evaluation at `at`, the harness's clock set there: its run requests and
    skip message, as the scheduler would get them."""
    set_clock(at)
    definitions = build_definitions(registry)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=at,
                                   resources=definitions.resources,
                                   repository_def=definitions.get_repository_def()) as context:
        data = definitions.resolve_schedule_def(schedule).evaluate_tick(context)
    return list(data.run_requests or []), data.skip_message


def execute(registry: Path, instance: dg.DagsterInstance, job: str, request: dg.RunRequest
            ) -> dg.ExecuteInProcessResult:
    """Runs a request on the instance, in this process."""
    definitions = build_definitions(registry)
    quiet: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if job != "lifecycle":  # a hold job: its action, which its default config would give
        quiet["ops"] = {"held_sandbox": {"config": {"action": job.removeprefix("hold_")}}}
    return definitions.resolve_job_def(job).execute_in_process(
        partition_key=request.partition_key, instance=instance, tags=dict(request.tags),
        raise_on_error=False, run_config=quiet)


def latest_hold(instance: dg.DagsterInstance) -> dict[str, Any]:
    """The metadata of held_sandbox's latest materialization, values unwrapped."""
    [record] = instance.fetch_materializations(dg.AssetKey("held_sandbox"), limit=1).records
    return {k: getattr(v, "value", v)
            for k, v in record.asset_materialization.metadata.items()}


def latest_check(instance: dg.DagsterInstance) -> Any:
    """The latest reservation_clean evaluation of gpu-box."""
    from mlci_dagster.compat import check_evaluations_page

    key = dg.AssetCheckKey(dg.AssetKey(["reservation", RESERVATION]), "reservation_clean")
    [record] = check_evaluations_page(instance, key, 1, None)
    return record.event.dagster_event.event_specific_data
