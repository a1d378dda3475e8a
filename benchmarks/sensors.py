"""Two figures for the image sensors and the schedule, printed, not asserted.

(a) push → first stage: a real `docker-registry` and the real `dagster-daemon run` on loopback,
    one config on one engine watching `<registry>/ml/platform:nightly` with
    `image_poll_interval_s: 1`. For each push (a manifest PUT with a new layer) it prints the
    seconds from the PUT's answer to the run's creation (sensor tick), to RUN_START (launch)
    and to the `image` step's STEP_START, all from event-log timestamps.
(b) the `nightly` schedule's evaluation over 2,000 configs × 4 engines (8,000 run requests),
    with the 2,000 dynamic partitions added first: the registry load (parse and validate 2,000
    YAML files) and the tick with the registry already loaded, timed apart.

Run: .venv/bin/python -m benchmarks.sensors [--pushes N] [--configs N] [--skip-daemon]
Needs /usr/bin/docker-registry for (a): scripts/install-test-services.sh installs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import requests
import yaml

from mlci_dagster.assets.lifecycle import LIFECYCLE_OP
from mlci_dagster.compat import caching_partitions_loader
from mlci_dagster.providers.ports import allocate_free_port
from tests.support.dagster_services import wait_until
from tests.support.loopback import REGISTRY_BIN, background, push_image

VENV_BIN = Path(sys.executable).parent
TICK_GOAL_S = 5.0
CONFIG_YAML = """\
name: {name}
owners: {{default: bench}}
image: {{ref: "{ref}"}}
sandbox: {{services: []}}
pipelines:
  - {{name: noop, kind: command, command: ["true"]}}
"""


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Polls every 0.1 s: the latency measured here is in tenths of a second."""
    return wait_until(predicate, timeout_s, what, interval_s=0.1)


def event_time(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType,
               step: str | None = None) -> float | None:
    for record in instance.get_records_for_run(run_id, of_type=kind).records:
        entry = record.event_log_entry
        if step is None or entry.step_key == step:
            return entry.timestamp
    return None


def push_to_first_stage(tmp: Path, pushes: int) -> None:
    if not REGISTRY_BIN.exists():
        sys.exit(f"{REGISTRY_BIN} is missing: run scripts/install-test-services.sh (as root)")
    host = f"127.0.0.1:{allocate_free_port()}"
    base = f"http://{host}"
    (tmp / "oci.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "oci")}}, "http": {"addr": host}}))
    registry = tmp / "registry-a"
    (registry / "configs").mkdir(parents=True)
    (registry / "mlci.yaml").write_text(yaml.safe_dump({
        "engines": {"e1": {}}, "image_poll_interval_s": 1,
        "image_registries": {host: {"kind": "oci", "insecure": True}}}))
    (registry / "configs" / "bench.yaml").write_text(
        CONFIG_YAML.format(name="bench", ref=f"{host}/ml/platform:nightly"))
    home = tmp / "home-a"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "MLCI_REGISTRY": str(registry)}
    os.environ["DAGSTER_HOME"] = str(home)
    daemon = [str(VENV_BIN / "dagster-daemon"), "run", "-m", "mlci_dagster.definitions"]
    rows = []
    with dg.DagsterInstance.get() as instance, \
            background([str(REGISTRY_BIN), "serve", str(tmp / "oci.yml")], tmp / "oci.log"), \
            background(daemon, tmp / "daemon.log", env):
        instance.add_dynamic_partitions("config", ["bench"])
        wait_for(lambda: requests.get(f"{base}/v2/", timeout=1).ok, 20, "registry")
        # The daemon is warm once it has ticked the poll sensor (the tag does not exist yet).
        wait_for(lambda: any(s.instigator_name == "image_poll"
                             for s in instance.all_instigator_state()), 120, "image_poll tick")
        for i in range(pushes):
            digest = push_image(base, "ml/platform", "nightly", f"layer-{i}".encode())
            pushed = time.time()
            run = wait_for(lambda d=digest: instance.get_runs(
                filters=dg.RunsFilter(tags={"mlci/image_digest": d})), 120, "run")[0]
            step = wait_for(lambda r=run: event_time(instance, r.run_id,
                                                     dg.DagsterEventType.STEP_START,
                                                     LIFECYCLE_OP), 120, "lifecycle STEP_START")
            started = event_time(instance, run.run_id, dg.DagsterEventType.RUN_START)
            record = instance.get_run_record_by_id(run.run_id)
            rows.append((record.create_timestamp.timestamp() - pushed,
                         (started or step) - pushed, step - pushed))
            wait_for(lambda r=run: instance.get_run_by_id(r.run_id).is_finished, 120, "run end")
    print(f"(a) push -> first stage, real dagster-daemon, image_poll_interval_s=1, "
          f"{pushes} pushes")
    print(f"    {'':22} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, col in (("run created (tick)", 0), ("RUN_START (launch)", 1),
                      ("lifecycle STEP_START", 2)):
        values = [row[col] for row in rows]
        print(f"    {name:22} {statistics.median(values):9.2f} {min(values):7.2f} "
              f"{max(values):7.2f}")


def schedule_tick(tmp: Path, configs: int) -> None:
    from mlci_dagster.definitions import build_definitions
    from mlci_dagster.registry import load_registry

    registry = tmp / "registry-b"
    (registry / "configs").mkdir(parents=True)
    (registry / "mlci.yaml").write_text(yaml.safe_dump({"engines": {f"e{i}": {} for i in
                                                                    range(1, 5)}}))
    names = [f"cfg-{i:04d}" for i in range(configs)]
    for name in names:
        (registry / "configs" / f"{name}.yaml").write_text(
            CONFIG_YAML.format(name=name, ref="example.test/platform:nightly"))
    home = tmp / "home-b"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("config", names)
        start = time.perf_counter()
        load_registry(registry)
        load_s = time.perf_counter() - start
        definitions = build_definitions(registry)  # loads again: not timed here
        schedule = definitions.resolve_schedule_def("nightly")
        when = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)

        # What the daemon's code server uses: dynamic partitions read once per tick.
        partitions = caching_partitions_loader(instance)

        def tick() -> tuple[float, int]:
            start = time.perf_counter()
            with dg.partition_loading_context(dynamic_partitions_store=partitions), \
                    dg.build_schedule_context(
                        instance=instance, resources=definitions.resources,
                        repository_def=definitions.get_repository_def(),
                        scheduled_execution_time=when) as context:
                requests_ = schedule.evaluate_tick(context).run_requests or []
            return time.perf_counter() - start, len(requests_)

        cold_s, count = tick()  # parses and validates the registry on the way
        warm_s, _ = tick()  # a long-lived code server: the parsed registry is cached
    print(f"(b) nightly schedule over {configs} configs x 4 engines ({count} run requests)")
    print(f"    load_registry (parse + validate {configs} files): {load_s:6.2f} s")
    print(f"    first tick (registry parsed on the way):        {cold_s:6.2f} s")
    print(f"    next tick (registry cached, files unchanged):   {warm_s:6.2f} s")
    print(f"    goal <= {TICK_GOAL_S:g} s: {'met' if warm_s <= TICK_GOAL_S else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--configs", type=int, default=2000)
    parser.add_argument("--skip-daemon", action="store_true", help="only figure (b)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_daemon:
            push_to_first_stage(Path(tmp), args.pushes)
        schedule_tick(Path(tmp), args.configs)


if __name__ == "__main__":
    main()
