"""What uploading a run's evidence costs, on the ML example: runs its matrix with `mlci run` (the
evidence goes to the default local store as part of each lifecycle), then uploads each run's
evidence again, file by file as the lifecycle does, to an S3 bucket on moto's server (loopback)
and to a fresh local store: the bytes, the seconds, and the share of the lifecycle's wall time.
Goal: at most 5% of a lifecycle's wall time.

Run: .venv/bin/python -m benchmarks.artifacts [--config C] [--engine E] [--parallel 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

from benchmarks.demo import REGISTRY, ROOT, make_home, warm_image
from mlci_dagster.artifacts.evidence import MIB
from mlci_dagster.artifacts.store import ArtifactStore, LocalStore, S3Store, put
from mlci_dagster.common.aws import AwsSettings
from tests.support.aws_proxy import FAKE_CREDENTIALS, moto_server

GOAL_SHARE = 0.05


def upload_again(store: ArtifactStore, record: dict) -> tuple[float, int]:
    """The record's evidence put again into `store`: (seconds, bytes)."""
    started, size = time.monotonic(), 0
    for path, artifact in record["artifacts"].items():
        size += put(store, f"bench/{artifact['key']}", Path(path), 100 * MIB).size
    return time.monotonic() - started, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--engine")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--image-home", type=Path, default=Path(
        os.environ.get("MLCI_IMAGE_HOME") or Path.home() / ".cache" / "mlci-dagster"))
    args = parser.parse_args()
    from mlci_dagster.registry import load_registry

    partitions = load_registry(REGISTRY).partitions(args.config, args.engine)
    image_home = args.image_home.resolve()
    (image_home / "images").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mlci-artifacts-"))
    try:
        home = make_home(tmp, "dagster_home", image_home / "images")
        warm_image(image_home, *partitions[0])
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        argv = [sys.executable, "-m", "mlci_dagster.cli", "--registry", str(REGISTRY), "run",
                "--parallel", str(args.parallel)]
        for flag in ("config", "engine"):
            if getattr(args, flag):
                argv += [f"--{flag}", getattr(args, flag)]
        print(f"mlci run: {len(partitions)} partitions of {REGISTRY.relative_to(ROOT)}",
              flush=True)
        subprocess.run(argv, env=env, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        os.environ["DAGSTER_HOME"] = str(home)
        import dagster as dg

        from mlci_dagster.event_log import new_results

        with dg.DagsterInstance.get() as instance:
            records = [r.to_json() for _, r in new_results(instance, 0)]
        os.environ.update(FAKE_CREDENTIALS)
        with moto_server(tmp / "moto.log") as url:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(
                Bucket="evidence")
            stores = {"s3 (moto, loopback)": S3Store("evidence", "", AwsSettings("us-east-1", url)),
                      "local": LocalStore(tmp / "store")}
            print(f"{'partition':26} {'files':>5} {'bytes':>10} {'lifecycle s':>11} "
                  + " ".join(f"{name + ' s':>20} {'share':>6}" for name in stores))
            worst = 0.0
            for record in records:
                cells = []
                for store in stores.values():
                    seconds, size = upload_again(store, record)
                    share = seconds / record["duration_s"]
                    worst = max(worst, share)
                    cells.append(f"{seconds:>20.3f} {share:>6.1%}")
                print(f"{record['partition']:26} {len(record['artifacts']):>5} {size:>10,} "
                      f"{record['duration_s']:>11.1f} " + " ".join(cells), flush=True)
            print(f"largest share of a lifecycle's wall time: {worst:.2%} (goal <= "
                  f"{GOAL_SHARE:.0%}: {'met' if worst <= GOAL_SHARE else 'NOT met'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
