"""Memory and storage of a lifecycle whose command pipeline floods stdout.

For each size, one real lifecycle runs through Dagster in a fresh DAGSTER_HOME under a temporary
directory: a prebuilt image reference, no services, and one command pipeline that writes that
many bytes of 100-byte lines to stdout, then a last line holding an expected substring and a
captured value. The lifecycle runs in a child process that does nothing else; its peak RSS
comes from wait4 (the maximum over the child and the descendants it waited for, so the
pipeline's own process counts too, though it stays small). Prints, per size: that peak, how
much DAGSTER_HOME grew outside mlci/logs (the event log, metadata, stored values), and the
size of mlci/logs, which is meant to hold the output. Goal: at most 300 MB of RSS and 1 MB
stored per run, flat in the output size; printed, not asserted.

Run: .venv/bin/python benchmarks/output_flood.py [--sizes 10M 200M 1G]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_RSS_MB, GOAL_STORED_BYTES = 300, 1_000_000
CONFIG, ENGINE = "flood", "e1"
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
FLOOD = """\
import sys
out, block = sys.stdout.buffer, (b'x' * 99 + b'\\n') * 10_000
for _ in range({blocks}):
    out.write(block)
out.write(b'flood done rows={rows}\\n')
"""


def parse_size(text: str) -> int:
    unit = text[-1:].upper()
    return int(float(text[:-1]) * UNITS[unit]) if unit in UNITS else int(text)


def write_registry(root: Path, size: int) -> Path:
    """Config `flood`: its one pipeline writes `size` bytes (rounded down to whole megabytes)
    to stdout, and must print `flood done`; `rows` is captured from its last line."""
    blocks = size // 1_000_000
    pipeline = {
        "kind": "command", "name": "flood", "timeout_s": 1800,
        "command": [sys.executable, "-c", FLOOD.format(blocks=blocks, rows=blocks * 10_000)],
        "expect_output": ["flood done"], "outputs": {"rows": r"rows=(\d+)"},
    }
    config = {
        "name": CONFIG, "owners": {"default": "bench"},
        "image": {"ref": "example/flood@sha256:0000"},
        "sandbox": {"services": []},
        "pipelines": [pipeline],
        "timeouts": {"pipeline_runs_s": 1800},
    }
    (root / "configs").mkdir(parents=True)
    (root / "mlci.yaml").write_text(json.dumps({"engines": {ENGINE: {}}}))
    (root / "configs" / f"{CONFIG}.yaml").write_text(json.dumps(config))
    return root


def tree_bytes(root: Path, skip: Path | None = None) -> int:
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and (skip is None or not p.is_relative_to(skip)))


def run_lifecycle(registry: Path) -> None:
    """In the child: one partition's lifecycle on the instance at DAGSTER_HOME."""
    import dagster as dg

    from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions

    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(partition_key=f"{CONFIG}|{ENGINE}", instance=instance,
                                        raise_on_error=False, run_config=RUN_CONFIG)
    print(json.dumps({"success": result.success}))


def measure(size: int, tmp: Path) -> dict[str, object]:
    import dagster as dg

    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:  # storage created before, so not counted
        instance.add_dynamic_partitions("config", [CONFIG])
    logs = home / "mlci" / "logs"
    before = tree_bytes(home, skip=logs)
    registry = write_registry(tmp / "registry", size)

    started = time.monotonic()
    child = subprocess.Popen([sys.executable, __file__, "--child", str(registry)], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    report = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    lines = report.strip().splitlines()
    success = child.returncode == 0 and bool(lines) and json.loads(lines[-1])["success"]
    return {
        "size": size,
        "rss_mb": usage.ru_maxrss / 1024,
        "stored": tree_bytes(home, skip=logs) - before,
        "logs": tree_bytes(logs) if logs.exists() else 0,
        "seconds": seconds,
        "passed": success,
    }


def human(size: int) -> str:
    for unit, factor in sorted(UNITS.items(), key=lambda u: -u[1]):
        if size >= factor:
            return f"{size / factor:g} {unit}B"
    return f"{size} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "200M", "1G"],
                        help="bytes of stdout per run, e.g. 10M 200M 1G")
    parser.add_argument("--child", metavar="REGISTRY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_lifecycle(Path(args.child))
        return

    print(f"{'output':>8} {'peak RSS MB':>12} {'stored bytes':>13} {'log bytes':>14} "
          f"{'seconds':>8}  lifecycle")
    for size in map(parse_size, args.sizes):
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(size, Path(tmp))
        print(f"{human(size):>8} {row['rss_mb']:>12.0f} {row['stored']:>13,} "
              f"{row['logs']:>14,} {row['seconds']:>8.1f}  "
              f"{'passed' if row['passed'] else 'FAILED'}", flush=True)
    print(f"goal: at most {GOAL_RSS_MB} MB peak RSS and {GOAL_STORED_BYTES:,} bytes stored per "
          "run, flat in the output size")


if __name__ == "__main__":
    main()
