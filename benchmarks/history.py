"""History figures: analysis over 100,000 results, and consolidating 100 new results.

1. `analyze` over 1,000 partitions × 100 runs (synthetic records with durations, a metric,
   failures, flakes and slowdowns mixed in). Goal ≤ 2 s.
2. Consolidation as the `history` asset does it: read the stored table back (pickle, as the
   filesystem IO manager stores it), fetch the results recorded after its cursor from a real
   SQLite Dagster instance, append, store again. With 100 new results and a stored history of
   1,000 / 10,000 / 100,000 rows. Goal ≤ 1 s, independent of history size.

Run: .venv/bin/python benchmarks/history.py
"""

from __future__ import annotations

import os
import pickle
import random
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg

from mlci_dagster.event_log import RESULTS_ASSET, consolidate
from mlci_dagster.history.analysis import analyze
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.registry.models import HistorySettings

NOW = time.time()


def synthetic_record(partition: int, run: int, rng: random.Random) -> ResultRecord:
    config, engine = f"config-{partition // 4:03d}", f"engine-{partition % 4}"
    broken = partition % 10 == 0 and run > 90  # a regression
    flaky = partition % 10 == 1 and rng.random() < 0.3
    status = "fail-pipeline_runs" if broken or flaky else "pass"
    slow = 2.0 if partition % 10 == 2 and run > 97 else 1.0
    duration = rng.gauss(30, 2) * slow
    return ResultRecord.model_validate({
        "partition": f"{config}|{engine}", "config": config, "engine": engine,
        "config_id": "c1", "status": status,
        "failed_stage": None if status == "pass" else "pipeline_runs",
        "failure_kind": None if status == "pass" else "product",
        "image_digest": f"sha256:{run // 10 if not broken else 99}", "code_version": "0.1.0",
        "trigger": "schedule", "run_id": f"{partition}-{run}",
        "started_at": NOW - (100 - run) * 86_400 / 4, "finished_at": NOW - (100 - run) * 86_400 / 4
        + duration, "duration_s": duration,
        "stages": {s: {"status": "pass", "duration_s": duration / 5} for s in
                   ("image", "sandbox", "pipeline_runs", "ui_smoke", "teardown")},
        "pipelines": {"train": {"passed": status == "pass", "duration_s": duration / 2}},
        "metrics": {"rmse": {"value": rng.gauss(0.2, 0.01), "direction": "lower_is_better"}},
    })


def synthetic_table(partitions: int, runs: int, seed: int = 7):
    rng = random.Random(seed)
    records = [synthetic_record(p, r, rng) for r in range(runs) for p in range(partitions)]
    return append_rows(None, (record_to_row(rec, i + 1) for i, rec in enumerate(records)))


def bench_analysis() -> None:
    table = synthetic_table(1000, 100)
    partitions = sorted(table["partition"].unique())
    times = []
    for _ in range(3):
        start = time.perf_counter()
        summaries = analyze(table, partitions, HistorySettings(stale_after_h=24 * 365), NOW)
        times.append(time.perf_counter() - start)
    by_status: dict[str, int] = {}
    for s in summaries:
        by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
    slow = sum(1 for s in summaries if s.slowdowns)
    print(f"analysis: {len(table):,} rows, {len(partitions):,} partitions: "
          f"median {statistics.median(times):.2f}s (runs: {', '.join(f'{t:.2f}' for t in times)})"
          f"  goal <= 2 s: {'met' if statistics.median(times) <= 2 else 'NOT met'}")
    print(f"  statuses: {by_status}; partitions with a slowdown: {slow}")


def bench_consolidation(home: Path) -> None:
    os.environ["DAGSTER_HOME"] = str(home)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    rng = random.Random(3)
    with dg.DagsterInstance.get() as instance:
        for size in (1_000, 10_000, 100_000):
            stored = home / f"history-{size}.pkl"
            table = synthetic_table(size // 100, 100)
            # The stored table's cursor sits below every event written next.
            table["storage_id"] = range(-len(table), 0)
            stored.write_bytes(pickle.dumps(table))
            before = instance.fetch_materializations(RESULTS_ASSET, limit=1).records
            cursor_row = before[0].storage_id if before else 0
            for i in range(100):
                instance.report_runless_asset_event(dg.AssetMaterialization(
                    RESULTS_ASSET, metadata={"record": dg.MetadataValue.json(
                        synthetic_record(i, 100, rng).to_json())}))
            table.loc[len(table) - 1, "storage_id"] = cursor_row  # everything newer is new
            stored.write_bytes(pickle.dumps(table))

            start = time.perf_counter()
            previous = pickle.loads(stored.read_bytes())
            updated, added = consolidate(instance, previous)
            stored.write_bytes(pickle.dumps(updated))
            seconds = time.perf_counter() - start
            print(f"consolidate 100 new into {size:>7,}: {seconds:.3f}s (added {added}, now "
                  f"{len(updated):,} rows)  goal <= 1 s: {'met' if seconds <= 1 else 'NOT met'}")


def main() -> None:
    bench_analysis()
    with tempfile.TemporaryDirectory() as tmp:
        bench_consolidation(Path(tmp))


if __name__ == "__main__":
    main()
