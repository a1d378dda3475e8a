"""Two simulated days of the reservation in examples/reservations (gpu-box: capacity 1, America/
New_York, serve-demo stood up 08:00-19:00 on weekdays, nightly batch at 02:00 UTC), printed as a
timeline: Monday 2026-03-09 (the day after the change to daylight-saving time) runs as
scheduled; on Tuesday the evening's hold_down is missed and the pre-batch guard takes the
deployment down before the batch.

Everything runs for real on a fresh SQLite instance: each schedule is evaluated by Dagster at its
instant (the harness's clock set there for this process and every process it starts), the
holds' runs execute on the instance, the sandboxes are real processes with real ports, the run
queue's limit is what the coordinator gives the daemon, and the batches go through `mlci run`'s
executor, which waits for a free slot as the queue does. Times are the simulated clock's; the
durations are real.

Run: .venv/bin/python -m benchmarks.reservation_day
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from pathlib import Path

import dagster as dg

from mlci_dagster.cli import _instance
from mlci_dagster.common import clock
from mlci_dagster.launch.pools import pool_limits, pool_of
from mlci_dagster.launch.runner import PartitionRun, run_partitions
from mlci_dagster.paths import EXAMPLES
from mlci_dagster.registry import load_registry
from mlci_dagster.reservations.leases import holds_by_reservation
from mlci_dagster.reservations.report import leases_text
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.vocabulary import split_partition_key
from tests.support.reservations import (
    NEW_YORK,
    RESERVATION,
    execute,
    latest_check,
    latest_hold,
    set_clock,
    tick,
)

REGISTRY = EXAMPLES / "reservations"


class Timeline:
    def __init__(self) -> None:
        self.day = ""

    def note(self, who: str, what: str) -> None:
        now = dt.datetime.fromtimestamp(clock.now(), NEW_YORK)
        day = now.strftime("%a %Y-%m-%d (%Z)")
        if day != self.day:
            print(f"\n{day}", flush=True)
            self.day = day
        print(f"  {now:%H:%M:%S}  {who:<18} {what}", flush=True)


def queue_limit(instance: dg.DagsterInstance) -> int:
    """gpu-box's limit as the coordinator gives it to the daemon at this moment."""
    config = instance.run_coordinator.get_run_queue_config()
    return next(limit["limit"] for limit in config.tag_concurrency_limits
                if limit.get("value") == RESERVATION)


def hold(timeline: Timeline, instance: dg.DagsterInstance, action: str, at: dt.datetime
         ) -> None:
    schedule = f"hold_{action}_gpu_box"
    [request], _ = tick(REGISTRY, instance, schedule, at)
    result = execute(REGISTRY, instance, f"hold_{action}", request)
    state = latest_hold(instance)
    if action == "up":
        timeline.note(schedule, f"held_sandbox up: {state['partition']}, web at "
                      f"{state['endpoint_web']}; lease (hold) due down {state['due_down']}"
                      + ("" if result.success else " FAILED"))
    else:
        timeline.note(schedule, f"held_sandbox down: {state['sandbox_id']} destroyed, lease "
                      "released" + ("" if result.success else " FAILED"))
    held = holds_by_reservation(resource().reservations(instance).store).get(RESERVATION, 0)
    timeline.note("run queue", f"{RESERVATION} limit {queue_limit(instance)} (capacity 1, "
                  f"{held} held by day): its runs wait in Dagster's queue"
                  if held else f"{RESERVATION} limit {queue_limit(instance)} (capacity 1)")


def resource() -> MlciResource:
    return MlciResource(registry_path=str(REGISTRY))


def nightly(timeline: Timeline, instance: dg.DagsterInstance, at: dt.datetime) -> None:
    requests, skipped = tick(REGISTRY, instance, "nightly", at)
    check = latest_check(instance)
    actions = check.metadata["actions"].value
    timeline.note("nightly", f"pre-batch guard: {RESERVATION} "
                  f"{'clean' if check.passed else 'DIRTY: ' + check.description}"
                  + (f" after it {'; '.join(actions)}" if actions else "")
                  + f"; {len(requests)} runs requested" + (f" ({skipped})" if skipped else ""))
    registry = load_registry(REGISTRY)
    keys = [str(r.partition_key) for r in requests]
    pools = {key: pool_of(registry, split_partition_key(key)[0]) for key in keys}
    store = resource().reservations(instance).store

    def done(item: PartitionRun) -> None:
        timeline.note(item.key, f"{'pass' if item.success else 'FAILED'} in "
                      f"{item.seconds:.1f}s (run {item.run_id[:8]}), lease released")

    def wait(item: PartitionRun) -> None:
        timeline.note(item.key, f"waits for a free slot of {RESERVATION} (capacity 1)")

    for key in keys:
        timeline.note(key, "requested")
    run_partitions(instance, registry.root, keys, pools, pool_limits(registry.settings), 2,
                   "schedule", Path(os.environ["DAGSTER_HOME"]) / "mlci", on_done=done,
                   on_lost=lambda item: None, on_wait=wait,
                   held=lambda: holds_by_reservation(store))


def new_york(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, minute, tzinfo=NEW_YORK)


def main() -> None:
    logging.getLogger("dagster").setLevel(logging.WARNING)  # the ticks' own log lines
    with tempfile.TemporaryDirectory() as home:
        os.environ["DAGSTER_HOME"] = home
        os.environ["MLCI_REGISTRY"] = str(REGISTRY)
        registry = load_registry(REGISTRY)
        instance = _instance(registry)  # writes gpu-box's limit into dagster.yaml
        instance.add_dynamic_partitions("config", sorted(registry.configs))
        timeline = Timeline()
        print(__doc__.split("\n\n")[0])
        hold(timeline, instance, "up", new_york(9, 8))
        hold(timeline, instance, "down", new_york(9, 19))
        nightly(timeline, instance, new_york(9, 22))
        hold(timeline, instance, "up", new_york(10, 8))
        set_clock(new_york(10, 12))
        leases = leases_text(resource().reservations(instance)).splitlines()
        timeline.note("mlci leases", leases[0])
        for line in leases[1:]:
            print(f"{'':30}{line}")
        set_clock(new_york(10, 19))
        timeline.note("hold_down_gpu_box", "missed: the daemon was stopped from 18:30 to 21:30")
        nightly(timeline, instance, new_york(10, 22))
        os.environ.pop(clock.OFFSET_ENV, None)


if __name__ == "__main__":
    main()
