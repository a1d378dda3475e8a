"""The MLflow tracking server (REST API + web UI) of one sandbox, on 127.0.0.1:--port.

The backend store comes from MLFLOW_BACKEND_URI (an engine variable): SQLite in the sandbox, or
the sandbox's PostgreSQL, which starts alongside: wait until it takes connections, then exec
the server so it stays in this service's process group.
"""

import argparse
import os
import sys
import time
from pathlib import Path


def wait_for_database(uri: str, timeout_s: float) -> None:
    if not uri.startswith("postgresql"):
        return
    import psycopg2

    uri = uri.replace("postgresql+psycopg2://", "postgresql://", 1)  # SQLAlchemy's driver tag

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg2.connect(uri, connect_timeout=2).close()
            return
        except psycopg2.OperationalError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow: backend store not reachable: {exc}") from exc
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--db-wait-s", type=float, default=120)
    args = parser.parse_args()
    uri = os.environ["MLFLOW_BACKEND_URI"]
    wait_for_database(uri, args.db_wait_s)
    # No job runner: it spawns a consumer pool and keeps its queue in a /dev/shm directory
    # that a killed server would leave behind.
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    mlflow = str(Path(sys.executable).parent / "mlflow")
    os.execv(mlflow, [mlflow, "server", "--backend-store-uri", uri,
                      "--artifacts-destination", str(args.artifacts.resolve()),
                      "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"])


if __name__ == "__main__":
    main()
