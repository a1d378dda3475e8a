"""Culprit finding on a real git repository of 16 commits where commit 11 breaks the partition
(its model check raises a ValueError from there on): a run at commit 1 passes, one at commit 16
fails, then `mlci culprit find` reruns the partition at commits in between (each a Dagster run
whose image is built from that commit's files) until commit 11 is named and confirmed by a rerun
of it and its parent. Once with the pool at width 1, once at width 3 (culprit_search.max_width;
the local pool has no limit of its own). Prints, per width, the culprit, the reruns, the rounds,
the wall time of the search, and the worst case the search was allowed.

Goal (issue 26): the culprit named and confirmed in at most 6 runs at width 1, in fewer rounds at
width 3.

Run: .venv/bin/python -m benchmarks.bisect [--commits 16] [--breaks 11]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

from mlci_dagster.cli import main as mlci
from mlci_dagster.culprits.search import worst_case_runs
from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
from mlci_dagster.launch.runner import QUIET_RUN_CONFIG
from mlci_dagster.searches import latest_searches
from tests.support.culprit_repo import PARTITION, make_repo, settings


def search(workdir: Path, commits: int, breaks: int, width: int) -> dict:
    home = workdir / f"home-{width}"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    shas = make_repo(workdir / f"repo-{width}", commits, breaks)
    registry = workdir / f"repo-{width}" / "reg"
    (registry / "mlci.yaml").write_text(yaml.safe_dump(settings(max_width=width)))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("config", ["model"])
        job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
        for sha in (shas[0], shas[-1]):  # the last pass and the first failure, as tier runs
            job.execute_in_process(partition_key=PARTITION, instance=instance,
                                   raise_on_error=False, run_config=QUIET_RUN_CONFIG,
                                   tags={"mlci/sha": sha, "mlci/tier": "nightly"})
        start = time.monotonic()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = mlci(["--registry", str(registry), "culprit", "find", PARTITION])
        seconds = time.monotonic() - start
        (found,) = latest_searches(instance).values()
    last_line = out.getvalue().strip().splitlines()[-1]
    return {"width": width, "exit": code, "culprit": found["culprit"],
            "expected": shas[breaks - 1], "reruns": len(found["reruns"]),
            "rounds": int(last_line.rsplit(" in ", 1)[1].split()[0]),
            "seconds": seconds, "worst": worst_case_runs(commits - 1, width), "text": last_line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=16)
    parser.add_argument("--breaks", type=int, default=11)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlci-bisect-") as tmp:
        for width in (1, 3):
            rows.append(search(Path(tmp), args.commits, args.breaks, width))
    print(f"{args.commits} commits, commit {args.breaks} breaks the partition\n")
    print(f"{'width':>5} {'culprit':<14}{'right':<7}{'reruns':>6} {'worst':>5} {'rounds':>6} "
          f"{'wall s':>7}")
    for row in rows:
        print(f"{row['width']:>5} {row['culprit'][:12]:<14}"
              f"{'yes' if row['culprit'] == row['expected'] else 'NO':<7}{row['reruns']:>6} "
              f"{row['worst']:>5} {row['rounds']:>6} {row['seconds']:>7.1f}")
    for row in rows:
        print(f"\nwidth {row['width']}: {row['text']}")


if __name__ == "__main__":
    main()
