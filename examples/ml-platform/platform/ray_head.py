"""A Ray head node (GCS, raylet, dashboard with the Jobs API) for one sandbox, dashboard on
127.0.0.1:--port, in the foreground until SIGTERM.

Ray does not keep its processes in one process group: the raylet starts each worker in a
process group of its own, and the Jobs API runs each job's entrypoint in a new session (with a
watcher that may miss a dying supervisor). Killing this service's group would leave them
running. So every Ray process inherits a token in its environment, and on SIGTERM (or when Ray
exits) this wrapper kills every process carrying it, until none is left.

Ray's session directory holds Unix sockets, whose paths may not exceed 107 bytes: it lives in
the sandbox (./ray-session) behind a short symlink /tmp/mlci-ray/<token>, removed on exit;
links left by a killed wrapper dangle once their sandbox is gone and are pruned at start. The
same link is every Ray process's TMPDIR, so their temporary files (the dashboard's
multiprocessing sockets, say) go into the sandbox too.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_ENV = "MLCI_RAY_HEAD_TOKEN"
LINKS = Path("/tmp/mlci-ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def marked_processes(token: str) -> list[int]:
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_marked(token: str, timeout_s: float = 4.0) -> None:
    """SIGKILL every process with the token until two scans in a row find none alive."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        pids = marked_processes(token)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:  # reap our own children so they do not linger as zombies
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        quiet = quiet + 1 if not [p for p in pids if _alive(p)] else 0
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def make_link(link: Path, target: Path) -> None:
    """The short link to the session; prunes dangling ones (their sandbox is gone)."""
    for _ in range(10):  # another wrapper may remove the empty folder between two steps
        LINKS.mkdir(exist_ok=True)
        for old in LINKS.iterdir():
            if old.is_symlink() and not old.exists():
                old.unlink(missing_ok=True)
        try:
            link.symlink_to(target)
            return
        except FileNotFoundError:
            continue
    raise SystemExit(f"ray head: could not create {link}")


def remove_link(link: Path) -> None:
    link.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        LINKS.rmdir()  # only when no other sandbox's link is in it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True, help="the dashboard's port")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--object-store-mb", type=int, default=100)
    args = parser.parse_args()

    token = uuid.uuid4().hex
    session = Path.cwd() / "ray-session"
    session.mkdir()
    link = LINKS / token[:12]
    make_link(link, session)

    ray = str(Path(sys.executable).parent / "ray")
    argv = [
        ray, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--port=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={args.port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--min-worker-port=0", "--max-worker-port=0",
        f"--num-cpus={args.num_cpus}", f"--object-store-memory={args.object_store_mb * 2**20}",
        f"--temp-dir={link}",
    ]
    ray_proc = subprocess.Popen(argv, env={**os.environ, TOKEN_ENV: token, "TMPDIR": str(link)})
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ray head: dashboard on 127.0.0.1:{args.port}, session in {session}", flush=True)
    code = None
    while not stopping and code is None:
        code = ray_proc.poll()
        time.sleep(0.2)
    kill_marked(token)
    remove_link(link)
    sys.exit(0 if stopping else code)


if __name__ == "__main__":
    main()
