"""Recovers the MLflow run a Ray job created: reads run_id=... from the job's logs (Jobs API),
checks the run over MLflow's REST API, and prints run_id=... and experiment_id=..."""

import argparse
import json
import re
import sys
import urllib.request


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ray", required=True, help="the Ray dashboard URL")
    parser.add_argument("--job", required=True, help="the job's submission id")
    parser.add_argument("--mlflow", required=True, help="the MLflow tracking server URL")
    args = parser.parse_args()

    logs = get(f"{args.ray}/api/jobs/{args.job}/logs")["logs"]
    found = re.findall(r"run_id=([0-9a-f]{32})", logs)
    if not found:
        sys.exit(f"job {args.job} logged no run_id; logs tail:\n{logs[-1000:]}")
    run = get(f"{args.mlflow}/api/2.0/mlflow/runs/get?run_id={found[-1]}")["run"]
    print(f"run status {run['info']['status']}, metrics "
          f"{sorted(m['key'] for m in run['data'].get('metrics', []))}")
    print(f"experiment_id={run['info']['experiment_id']}")
    print(f"run_id={run['info']['run_id']}")


if __name__ == "__main__":
    main()
