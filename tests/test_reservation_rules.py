"""Reservations in mlci.yaml: their invariants, each reported with file and field; the wall-clock
arithmetic of daytime windows across daylight-saving changes; the schedules' firing times as
Dagster's own cron iterator computes them; and the lease table's rules on a real instance."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from mlci_dagster.compat import cron_ticks, instance_connection
from mlci_dagster.definitions import build_definitions
from mlci_dagster.launch.pools import lowered, with_pool_limits
from mlci_dagster.registry import RegistryError, load_registry, localtime
from mlci_dagster.registry.reservations import NightlySettings, ReservationSpec
from mlci_dagster.reservations.leases import LeaseKind, LeaseStore
from tests.support.registries import config, http_service, write_registry
from tests.support.reservations import race_for_slots

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def daytime(**overrides: Any) -> dict[str, Any]:
    return {"intent": "demo", "up": "08:00", "down": "19:00", **overrides}


def reservation(name: str = "gpu-box", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "provider": "local", "capacity": 1, "timezone": "America/New_York",
            **overrides}


def reserved_registry(root: Path, reservations: list[dict[str, Any]],
                      configs: list[dict[str, Any]] | None = None, **settings: Any) -> Path:
    """A registry whose configs `demo` and `train` bind to gpu-box (unless `configs`)."""
    configs = configs if configs is not None else [
        config("demo", sandbox={"services": [http_service()], "reservation": "gpu-box"}),
        config("train", sandbox={"services": [], "reservation": "gpu-box"},
               ui_smoke={"routes": []})]
    write_registry(root, configs, engines={"e1": {}})
    body = yaml.safe_load((root / "mlci.yaml").read_text())
    body.update({"reservations": reservations, **settings})
    (root / "mlci.yaml").write_text(yaml.safe_dump(body))
    return root


def problems_of(root: Path) -> list[str]:
    with pytest.raises(RegistryError) as caught:
        load_registry(root)
    return caught.value.problems


def test_a_valid_reservation_loads_with_its_daytime_and_binds_configs(tmp_path):
    root = reserved_registry(tmp_path, [reservation(daytime=daytime())])

    registry = load_registry(root)

    spec = registry.settings.reservation("gpu-box")
    assert (spec.capacity, spec.daytime.config, spec.daytime.engine) == (1, "demo", None)
    assert spec.daytime.weekdays == ["mon", "tue", "wed", "thu", "fri"]
    assert registry.configs["train"].config.sandbox.reservation == "gpu-box"


@pytest.mark.parametrize(
    ("reservations", "field", "expected"),
    [
        ([reservation(), reservation()], "reservations[1].name",
         "duplicate reservation 'gpu-box' (also reservations[0])"),
        ([reservation(capacity=0)], "reservations[0].capacity", "greater than or equal to 1"),
        ([reservation(timezone="Mars/Olympus")], "reservations[0].timezone",
         "expected an IANA timezone"),
        ([reservation(provider="nomad")], "reservations[0].provider", "unknown provider 'nomad'"),
        ([reservation(daytime=daytime(up="19:00", down="08:00"))], "reservations[0].daytime",
         "up: 19:00 is not before down 08:00"),
        ([reservation(daytime=daytime(up="8am"))], "reservations[0].daytime.up",
         "expected a time of day HH:MM"),
        ([reservation(daytime=daytime(weekdays=["mon", "mon"]))], "reservations[0].daytime",
         "weekdays: a day is listed twice"),
        ([reservation(daytime=daytime(weekdays=["funday"]))],
         "reservations[0].daytime.weekdays[0]", "'mon'"),
        ([reservation(daytime=daytime()), reservation("second", daytime=daytime())],
         "reservations[1].daytime", "a second daytime reservation on provider 'local', account "
         "'default' (reservations[0] 'gpu-box' has one; expected at most one per provider "
         "account)"),
        # 02:00 UTC is 21:00 or 22:00 in New York: inside a window that ends at 23:00.
        ([reservation(daytime=daytime(down="23:00"))], "reservations[0].daytime.down",
         "is not before the nightly schedule's start (02:00 UTC, which is 21:00 EST or 22:00 "
         "EDT there"),
        ([reservation(daytime=daytime(intent="nope"))], "reservations[0].daytime.intent",
         "unknown config 'nope'"),
        ([reservation(daytime=daytime(intent="demo|e9"))], "reservations[0].daytime.intent",
         "engine 'e9' does not apply to 'demo'"),
        ([reservation(daytime=daytime(colour="red"))], "reservations[0].daytime.colour",
         "unknown key"),
    ],
)
def test_reservation_invariants_are_reported_with_file_and_field(tmp_path, reservations, field,
                                                                  expected):
    root = reserved_registry(tmp_path, reservations)

    problems = problems_of(root)

    assert any(p.startswith(f"{root / 'mlci.yaml'}: {field}: ") and expected in p
               for p in problems), problems


def test_daytime_reservations_on_distinct_accounts_are_allowed(tmp_path):
    root = reserved_registry(tmp_path, [
        reservation(daytime=daytime()),
        reservation("other", account="lab-2", daytime=daytime(intent="train"))],
        configs=[config("demo", sandbox={"services": [http_service()], "reservation": "gpu-box"}),
                 config("train", sandbox={"services": [http_service()], "reservation": "other"})])

    registry = load_registry(root)

    assert [(r.name, r.account, r.capacity, r.daytime.intent if r.daytime else None)
            for r in registry.settings.reservations] == [("gpu-box", "default", 1, "demo"),
                                                         ("other", "lab-2", 1, "train")]
    assert {name: loaded.config.sandbox.reservation
            for name, loaded in registry.configs.items()} == {"demo": "gpu-box",
                                                              "train": "other"}


def test_a_nightly_start_moved_into_the_window_is_refused(tmp_path):
    """In Los Angeles 02:00 UTC is 18:00 (PST) or 19:00 (PDT): a 19:00 down is too late in
    winter only, and the message names the local time that collides."""
    root = reserved_registry(tmp_path, [reservation(timezone="America/Los_Angeles",
                                                    daytime=daytime())])

    [problem] = problems_of(root)

    assert "reservations[0].daytime.down: 19:00 America/Los_Angeles" in problem
    assert "which is 18:00 PST there" in problem
    # Moving the batch to 03:00 UTC (19:00 PST, 20:00 PDT) clears it.
    ok = reserved_registry(tmp_path / "ok", [reservation(timezone="America/Los_Angeles",
                                                         daytime=daytime())],
                           nightly={"at": "03:00", "timezone": "UTC"})
    assert load_registry(ok).settings.nightly.cron == "0 3 * * *"


@pytest.mark.parametrize(
    ("configs", "field", "expected"),
    [
        ([config("demo", sandbox={"services": [http_service()], "reservation": "h100"})],
         "sandbox.reservation", "unknown reservation 'h100' (expected one of: gpu-box)"),
        ([config("demo", sandbox={"provider": "kubernetes", "reservation": "gpu-box",
                                  "manifests": ["app.yaml"]})],
         "sandbox.reservation", "'gpu-box' reserves 'local' capacity (sandbox.provider is "
         "'kubernetes'"),
        ([config("demo", sandbox={"services": [http_service()], "reservation": "gpu-box",
                                  "pool": "p"})],
         "sandbox", "expected `pool` or `reservation`, not both"),
    ],
)
def test_a_config_binds_only_to_a_declared_reservation_of_its_provider(tmp_path, configs,
                                                                        field, expected):
    root = reserved_registry(tmp_path, [reservation()], configs=configs)

    problems = problems_of(root)

    assert any(p.startswith(f"{root / 'configs' / 'demo.yaml'}: {field}: ") and expected in p
               for p in problems), problems


def test_the_intent_must_be_bound_to_its_reservation(tmp_path):
    root = reserved_registry(tmp_path, [reservation(daytime=daytime())],
                             configs=[config("demo")])

    [problem] = problems_of(root)

    assert problem == (f"{root / 'mlci.yaml'}: reservations[0].daytime.intent: config 'demo' "
                       "is not bound to reservation 'gpu-box' (expected sandbox.reservation: "
                       "gpu-box in demo.yaml)")


def test_a_reservation_name_may_not_also_be_a_pool(tmp_path):
    root = reserved_registry(tmp_path, [reservation()], pools={"gpu-box": {"limit": 2}})

    assert any("reservations[0].name: 'gpu-box' is also a pool" in p for p in problems_of(root))


# --- wall-clock arithmetic -----------------------------------------------------------------


def at(tz: ZoneInfo, *parts: int) -> float:
    return dt.datetime(*parts, tzinfo=tz).timestamp()


def utc(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d %H:%M")


@pytest.mark.parametrize(
    ("after", "expected_utc"),
    [
        # March: New York moves to EDT on Sunday 2026-03-08.
        (at(NEW_YORK, 2026, 3, 6, 7, 0), "2026-03-06 13:00"),  # Friday 08:00 EST
        (at(NEW_YORK, 2026, 3, 6, 9, 0), "2026-03-09 12:00"),  # then Monday 08:00 EDT
        # November: back to EST on Sunday 2026-11-01.
        (at(NEW_YORK, 2026, 10, 30, 9, 0), "2026-11-02 13:00"),  # Monday 08:00 EST
        (at(NEW_YORK, 2026, 10, 29, 9, 0), "2026-10-30 12:00"),  # Friday 08:00 EDT
    ],
)
def test_a_daily_time_falls_on_the_same_wall_time_across_dst(after, expected_utc):
    weekdays = ["mon", "tue", "wed", "thu", "fri"]

    moment = localtime.next_instant(dt.time(8, 0), NEW_YORK, after, weekdays)

    assert utc(moment) == expected_utc
    assert localtime.local(moment, NEW_YORK).strftime("%a %H:%M") in {"Mon 08:00", "Fri 08:00"}


@pytest.mark.parametrize(
    ("start", "end", "tz", "cron", "expected"),
    [
        # hold_up at 08:00 on weekdays, America/New_York, across both changes of 2026.
        (at(NEW_YORK, 2026, 3, 5, 0, 0), at(NEW_YORK, 2026, 3, 11, 0, 0), "America/New_York",
         "0 8 * * 1,2,3,4,5",
         ["2026-03-05 13:00", "2026-03-06 13:00", "2026-03-09 12:00", "2026-03-10 12:00"]),
        (at(NEW_YORK, 2026, 10, 29, 0, 0), at(NEW_YORK, 2026, 11, 4, 0, 0), "America/New_York",
         "0 19 * * 1,2,3,4,5",
         ["2026-10-29 23:00", "2026-10-30 23:00", "2026-11-03 00:00", "2026-11-04 00:00"]),
        # Berlin changes on the last Sundays of March and October.
        (at(BERLIN, 2026, 3, 27, 0, 0), at(BERLIN, 2026, 3, 31, 0, 0), "Europe/Berlin",
         "0 8 * * 1,2,3,4,5", ["2026-03-27 07:00", "2026-03-30 06:00"]),
    ],
)
def test_the_hold_schedules_fire_at_local_time_across_dst_as_dagster_computes_it(
        start, end, tz, cron, expected):
    """Dagster's scheduler computes ticks with its cron iterator in the schedule's
    execution_timezone; these are the instants it fires the registry's schedules at."""
    spec = ReservationSpec.model_validate(reservation(timezone=tz, daytime=daytime()))
    assert cron in {spec.up_cron(), spec.down_cron()}

    ticks = [utc(t) for t in cron_ticks(cron, start, end, tz)]

    assert ticks == expected


def test_the_registrys_schedules_carry_the_reservations_timezone(tmp_path):
    root = reserved_registry(tmp_path, [reservation(daytime=daytime())],
                             nightly={"at": "02:30", "timezone": "Europe/Berlin"})

    schedules = {s.name: s for s in build_definitions(root).schedules}

    assert {name: (s.cron_schedule, s.execution_timezone) for name, s in schedules.items()} == {
        "nightly": ("30 2 * * *", "Europe/Berlin"),
        "hold_up_gpu_box": ("0 8 * * 1,2,3,4,5", "America/New_York"),
        "hold_down_gpu_box": ("0 19 * * 1,2,3,4,5", "America/New_York"),
    }


def test_a_hold_is_due_down_at_its_next_down_and_never_after_the_nightly_start():
    spec = ReservationSpec.model_validate(reservation(daytime=daytime()))
    nightly = NightlySettings()  # 02:00 UTC: 21:00 EST

    def due(moment: float) -> str:
        until = min(spec.next_down(moment), nightly.next_start(moment))
        return localtime.shown(until, NEW_YORK)

    assert due(at(NEW_YORK, 2026, 3, 9, 8, 0)) == "2026-03-09 19:00 EDT"  # morning: evening
    assert due(at(NEW_YORK, 2026, 3, 9, 20, 0)) == "2026-03-09 22:00 EDT"  # late: the batch
    assert due(at(NEW_YORK, 2026, 3, 7, 10, 0)) == "2026-03-07 21:00 EST"  # Saturday


# --- the run queue's limits -----------------------------------------------------------------


def test_mlci_sync_writes_reservation_capacities_into_the_coordinators_config(tmp_path):
    """Under `concurrency.runs` Dagster would take the limits over the coordinator's, which
    could then not lower a reservation's by its holds: they move into its config."""
    root = reserved_registry(tmp_path, [reservation(capacity=2)], pools={"p": {"limit": 3}})
    settings = load_registry(root).settings
    before = {"concurrency": {"runs": {"tag_concurrency_limits": [
        {"key": "team", "limit": 5}, {"key": "mlci/pool", "value": "gone", "limit": 1}]}}}

    after = with_pool_limits(before, settings)

    assert "concurrency" not in after
    assert after["run_coordinator"]["class"] == "PoolTaggingRunCoordinator"
    assert after["run_coordinator"]["config"]["tag_concurrency_limits"] == [
        {"key": "team", "limit": 5},
        {"key": "mlci/pool", "value": "gpu-box", "limit": 2},
        {"key": "mlci/pool", "value": "p", "limit": 3}]


def test_mlci_sync_moves_an_instance_synced_before_launch_to_the_coordinators_new_path(
        tmp_path):
    """An instance synced when the coordinator was mlci_dagster.run_coordinator: its limits and
    other settings are kept, its class path is the one that imports now."""
    root = reserved_registry(tmp_path, [reservation(capacity=2)])
    before = {"run_coordinator": {
        "module": "mlci_dagster.run_coordinator", "class": "PoolTaggingRunCoordinator",
        "config": {"max_concurrent_runs": 4, "tag_concurrency_limits": [
            {"key": "team", "limit": 5}]}}}

    after = with_pool_limits(before, load_registry(root).settings)

    assert after["run_coordinator"]["module"] == "mlci_dagster.launch.coordinator"
    assert after["run_coordinator"]["config"] == {"max_concurrent_runs": 4,
                                                  "tag_concurrency_limits": [
        {"key": "team", "limit": 5}, {"key": "mlci/pool", "value": "gpu-box", "limit": 2}]}
    module = __import__(after["run_coordinator"]["module"], fromlist=["_"])
    assert hasattr(module, after["run_coordinator"]["class"])


def test_holds_lower_their_reservations_limit_and_no_other():
    limits = [{"key": "mlci/pool", "value": "gpu-box", "limit": 2},
              {"key": "mlci/pool", "value": "p", "limit": 3}, {"key": "team", "limit": 1}]

    assert lowered(limits, {"gpu-box": 1}) == [
        {"key": "mlci/pool", "value": "gpu-box", "limit": 1},
        {"key": "mlci/pool", "value": "p", "limit": 3}, {"key": "team", "limit": 1}]
    assert lowered(limits, {"gpu-box": 5})[0]["limit"] == 0  # held whole: its runs wait


# --- the lease table -------------------------------------------------------------------------


def store(instance: dg.DagsterInstance) -> LeaseStore:
    return LeaseStore(lambda: instance_connection(instance))


def test_leases_take_free_slots_up_to_the_capacity_and_free_them(instance):
    leases = store(instance)

    first = leases.acquire("gpu-box", 2, kind=LeaseKind.RUN, holder="run-a", partition="a|e1",
                           now=100, expires_at=220)
    second = leases.acquire("gpu-box", 2, kind=LeaseKind.HOLD, holder="run-b",
                            partition="b|e1", now=101, expires_at=900, detail={"state": "up"})
    third = leases.acquire("gpu-box", 2, kind=LeaseKind.RUN, holder="run-c", partition="c|e1",
                           now=102, expires_at=222)

    assert (first.slot, second.slot, third) == (0, 1, None)
    assert leases.acquire("gpu-box", 2, kind=LeaseKind.RUN, holder="run-a", partition="a|e1",
                          now=103, expires_at=223) == first  # its own, again
    assert leases.renew("gpu-box", "run-a", 150, 270)
    assert [(lease.slot, lease.heartbeat_at, lease.expires_at)
            for lease in leases.leases("gpu-box")] == [(0, 150, 270), (1, 101, 900)]
    assert leases.release("gpu-box", "run-a") and not leases.release("gpu-box", "run-a")
    assert leases.acquire("gpu-box", 2, kind=LeaseKind.RUN, holder="run-c", partition="c|e1",
                          now=104, expires_at=224).slot == 0
    assert leases.leases("other") == []


def test_take_back_frees_only_the_lease_it_read(instance):
    leases = store(instance)
    old = leases.acquire("gpu-box", 1, kind=LeaseKind.RUN, holder="run-a", partition="a|e1",
                         now=1, expires_at=2)
    assert leases.take_back(old)
    leases.acquire("gpu-box", 1, kind=LeaseKind.RUN, holder="run-b", partition="b|e1", now=3,
                   expires_at=4)

    assert not leases.take_back(old)  # slot 0 is run-b's now
    assert [lease.holder for lease in leases.leases()] == ["run-b"]


def test_concurrent_acquirers_never_share_a_slot(instance):
    """Eight threads, each with its own connections, race for two slots of one reservation."""
    assert race_for_slots(instance, "gpu-box", 2, 8) == [0, 1]
    leases = store(instance).leases("gpu-box")
    assert [(lease.slot, lease.kind, lease.partition, lease.expires_at) for lease in leases] == [
        (0, LeaseKind.RUN, "a|e", 2), (1, LeaseKind.RUN, "a|e", 2)]
    holders = [lease.holder for lease in leases]  # two of the racers, one slot each
    assert len(set(holders)) == 2 and set(holders) <= {f"racer-{i}" for i in range(8)}, holders


def test_with_the_lease_table_out_of_reach_reserved_sandboxes_are_kept(tmp_path):
    """No sandbox of a reserved config is known not to be a hold's: none is reaped for its
    run being over (expiry still reaps it)."""
    from mlci_dagster.providers.handle import SandboxHandle
    from mlci_dagster.reservations.context import ReservationContext

    def unreachable():
        raise OSError("connection refused")

    registry = load_registry(reserved_registry(tmp_path, [reservation()],
                                               configs=[config("demo", sandbox={
                                                   "services": [http_service()],
                                                   "reservation": "gpu-box"}),
                                                        config("free")]))
    rctx = ReservationContext(registry, tmp_path, LeaseStore(unreachable), lambda run: True)

    keep = rctx.keep_held()

    def handle(name: str) -> SandboxHandle:
        return SandboxHandle(f"{name}.e1.1", "local", name, "e1", "run-1", 0, 1e12, "", "")

    assert keep(handle("demo")) == "holds unknown"
    assert keep(handle("free")) == ""
