"""Child processes in their own process groups: start, kill the whole group, prove it is gone."""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from mlci_dagster.common.redact import NO_SECRETS, Redactor
from mlci_dagster.providers.logpipe import (
    CHUNK_BYTES,
    STDERR,
    STDOUT,
    OutputWatcher,
    RedactingWriter,
    SharedLog,
)

PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DRAIN_S = 2.0  # after the group is killed, how long output from escaped processes is read
POLL_S = 0.1  # how often the wait for output also checks whether the process has ended
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def start_group(argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> int:
    """Starts `argv` as the leader of a new process group, output to `log_path`; returns its pid."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc.pid


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() not in _GONE:
                members.append(pid)
        except (OSError, psutil.Error):
            continue
    return members


def process_start(pid: int) -> int | None:
    """The start time of a live process in clock ticks since boot (None if gone or a zombie);
    with the pid it names one process, even after the pid is reused."""
    try:
        process = psutil.Process(pid)
        if process.status() in _GONE:
            return None
        created = process.create_time()
    except psutil.Error:
        return None
    # create_time adds the boot time, which the kernel may shift by a second as the clock is
    # adjusted; ticks since boot never change (and ledgers already hold them).
    return round((created - psutil.boot_time()) * CLOCK_TICKS)


def marked_processes(name: str, value: str) -> list[int]:
    """Live processes whose environment holds `name=value`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() not in _GONE and process.environ().get(name) == value:
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def kill_marked(name: str, value: str, wait_s: float = 5.0) -> dict[str, list[int]]:
    """SIGKILLs every live process marked `name=value`: {"killed": [...], "left": [...]}."""
    killed = marked_processes(name, value)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    left = killed
    while left and time.monotonic() < deadline:
        for pid in left:
            _reap(pid)
        left = [pid for pid in left if process_start(pid) is not None]
        if left:
            time.sleep(0.05)
    return {"killed": killed, "left": left}


def _reap(pid: int) -> None:
    """Collects the exit status of our own children, so they do not linger as zombies."""
    try:
        while os.waitpid(pid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def kill_group(pgid: int, grace_s: float = 5.0) -> list[int]:
    """SIGTERM the group, SIGKILL what is left after `grace_s`; returns pids still alive after."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while True:
            _reap(pgid)
            if not group_members(pgid):
                return []
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    return group_members(pgid)


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `sig` when the thread that started it dies. Start the
    child from a thread that lives as long as the child should (the main thread, or the one
    waiting for it)."""

    def arm() -> None:
        if sig != signal.SIGKILL:
            # Inherited as ignored (a background job of a shell without job control), the
            # signal would be lost; the child is started to receive it.
            signal.signal(sig, signal.SIG_DFL)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)

    return arm


@dataclass
class GroupResult:
    exit_code: int | None  # None when killed at the timeout
    timed_out: bool
    duration_s: float
    log_path: str  # the whole output, redacted
    stdout_tail: str  # the last TAIL_CHARS of each stream, redacted
    stderr_tail: str


def run_group(
    argv: list[str],
    *,
    cwd: Path | str,
    env: dict[str, str],
    timeout_s: float,
    log_path: Path | str,
    redactor: Redactor = NO_SECRETS,
    watcher: OutputWatcher | None = None,
    on_start: Callable[[int], None] = lambda pgid: None,
) -> GroupResult:
    """Runs `argv` to completion in its own process group; at the timeout kills the whole group.

    Whatever the process started is killed when it ends too, so nothing outlives it. Its stdout
    and stderr stream, redacted, into `log_path` (replaced), past `watcher` if given; only their
    tails stay in memory. Raises OSError when the program cannot be started.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    with open(log_path, "w", encoding="utf-8") as file:
        log = SharedLog(file)
        # A crashed run leaves no build or pipeline running: it dies with this thread.
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        writers = {
            proc.stdout.fileno(): RedactingWriter(log, STDOUT, redactor, watcher),
            proc.stderr.fileno(): RedactingWriter(log, STDERR, redactor, watcher),
        }
        timed_out = False
        try:
            on_start(proc.pid)
            _pump(writers, deadline, stop=lambda: proc.poll() is not None)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(proc.pid, grace_s=2.0)
            proc.wait()
            # A process that left the group may hold a pipe open: drain for a bounded time only.
            _pump(writers, time.monotonic() + DRAIN_S)
            proc.stdout.close()
            proc.stderr.close()
            for writer in writers.values():
                writer.close()
        stdout, stderr = writers.values()
        return GroupResult(None if timed_out else proc.returncode, timed_out,
                           time.monotonic() - start, str(log_path), stdout.tail, stderr.tail)


def _pump(writers: dict[int, RedactingWriter], deadline: float,
          stop: Callable[[], bool] = lambda: False) -> None:
    """Moves output from each pipe to its writer until every pipe is at its end, `stop()` or
    the deadline."""
    with selectors.DefaultSelector() as selector:
        for fd in writers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and not stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in selector.select(min(remaining, POLL_S)):
                chunk = os.read(key.fd, CHUNK_BYTES)
                if chunk:
                    writers[key.fd].write(chunk)
                else:
                    selector.unregister(key.fd)


def pids_text(leaked: Any) -> str:
    """`web 4121 4122, db 4130`: leaked pids per process group's name, or a list of them."""
    if isinstance(leaked, dict):
        return ", ".join(f"{name} {' '.join(str(p) for p in pids)}"
                         for name, pids in leaked.items())
    return " ".join(str(p) for p in leaked)
