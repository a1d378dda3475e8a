"""The harness's own overhead per partition, against a bare Dagster run of the same shape.

Runs the `lifecycle` job on a trivial registry (a prebuilt image reference, no services, one
`true` command pipeline, no UI routes), so the stages do next to nothing, and a job of six
no-op assets with the same dependencies and the same config × engine partitions. Both run in
process on one instance; after one warm-up run each, N runs of each are interleaved over
distinct partition keys. Prints median and mean seconds per partition and the median ratio.

Run: .venv/bin/python benchmarks/overhead.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg

from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions

GOAL = 1.5
CONFIGS = [f"bench-{i}" for i in range(5)]
ENGINE = "e1"
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
CONFIG_YAML = """\
name: {name}
owners: {{default: bench}}
image: {{ref: "example/trivial@sha256:0000"}}
sandbox: {{services: []}}
pipelines:
  - {{name: noop, kind: command, command: ["true"]}}
"""


def write_registry(root: Path) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "mlci.yaml").write_text(f"engines:\n  {ENGINE}: {{}}\n")
    for name in CONFIGS:
        (root / "configs" / f"{name}.yaml").write_text(CONFIG_YAML.format(name=name))
    return root


def bare_job() -> dg.JobDefinition:
    """Six no-op assets chained like the harness's stages, over identical partitions."""
    partitions = dg.MultiPartitionsDefinition({
        "config": dg.DynamicPartitionsDefinition(name="bare_config"),
        "engine": dg.StaticPartitionsDefinition([ENGINE]),
    })
    asset = dg.asset(key_prefix="bare", partitions_def=partitions)

    @asset
    def image() -> int:
        return 0

    @asset
    def sandbox(image: int) -> int:
        return 0

    @asset
    def pipeline_runs(image: int, sandbox: int) -> int:
        return 0

    @asset
    def ui_smoke(image: int, sandbox: int, pipeline_runs: int) -> int:
        return 0

    @asset
    def teardown(sandbox: int, pipeline_runs: int, ui_smoke: int) -> int:
        return 0

    @asset
    def results(image: int, sandbox: int, pipeline_runs: int, ui_smoke: int,
                teardown: int) -> int:
        return 0

    assets = [image, sandbox, pipeline_runs, ui_smoke, teardown, results]
    # Partitioning is inferred from the assets (passing partitions_def is deprecated).
    job = dg.define_asset_job("bare", selection=assets, executor_def=dg.in_process_executor)
    return dg.Definitions(assets=assets, jobs=[job]).resolve_job_def("bare")


def timed_run(job: dg.JobDefinition, key: str, instance: dg.DagsterInstance) -> float:
    start = time.perf_counter()
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                    run_config=RUN_CONFIG)
    elapsed = time.perf_counter() - start
    assert result.success, f"{job.name} run of {key} failed"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each job")
    runs = parser.parse_args().runs

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = str(home)
        instance = dg.DagsterInstance.get()
        instance.add_dynamic_partitions("config", CONFIGS)
        instance.add_dynamic_partitions("bare_config", CONFIGS)

        jobs = {
            "harness": build_definitions(write_registry(Path(tmp) / "registry"))
            .resolve_job_def(LIFECYCLE_JOB),
            "bare": bare_job(),
        }
        keys = [f"{config}|{ENGINE}" for config in CONFIGS]
        for job in jobs.values():  # warm-up: first-run costs excluded
            timed_run(job, keys[0], instance)
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for i in range(runs):
            for name, job in jobs.items():
                times[name].append(timed_run(job, keys[(i + 1) % len(keys)], instance))

    print(f"runs: {runs} per job, cpus: {os.cpu_count()}")
    print(f"{'':8} {'median s':>10} {'mean s':>10}")
    for name, samples in times.items():
        print(f"{name:8} {statistics.median(samples):10.3f} {statistics.mean(samples):10.3f}")
    ratio = statistics.median(times["harness"]) / statistics.median(times["bare"])
    print(f"median ratio: {ratio:.2f}x")
    print(f"goal <= {GOAL}x: {'met' if ratio <= GOAL else 'not met'}")


if __name__ == "__main__":
    main()
