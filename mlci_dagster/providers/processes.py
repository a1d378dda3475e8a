"""Child processes in their own process groups: start, kill the whole group, prove it is gone."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def start_group(argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> int:
    """Starts `argv` as the leader of a new process group, output to `log_path`; returns its pid."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc.pid


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def process_start(pid: int) -> int | None:
    """The start time of a live process in clock ticks since boot (None if gone or a zombie);
    with the pid it names one process, even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def marked_processes(name: str, value: str) -> list[int]:
    """Live processes whose environment holds `name=value`."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and process_start(int(entry.name)) is not None:
            try:
                if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
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


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies, so a crashed run leaves no build or pipeline
    running (run_group waits for its child, so the parent thread outlives it otherwise)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class GroupResult:
    exit_code: int | None  # None when killed at the timeout
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float


def run_group(
    argv: list[str],
    *,
    cwd: Path | str,
    env: dict[str, str],
    timeout_s: float,
    on_start: Callable[[int], None] = lambda pgid: None,
) -> GroupResult:
    """Runs `argv` to completion in its own process group; at the timeout kills the whole group.

    Whatever the process started is killed when it ends too, so nothing outlives it. Output goes
    to files, not pipes: a background child holding a pipe open cannot stall the wait.
    Raises OSError when the program cannot be started.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        on_start(proc.pid)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(proc.pid, grace_s=2.0)
            proc.wait()
        out.seek(0)
        err.seek(0)
        return GroupResult(
            None if timed_out else proc.returncode,
            out.read().decode("utf-8", errors="replace"),
            err.read().decode("utf-8", errors="replace"),
            timed_out,
            time.monotonic() - start,
        )
