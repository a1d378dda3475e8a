"""Child processes in their own process groups: start, kill the whole group, prove it is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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

    Whatever the process started is killed when it ends too, so nothing outlives it.
    Raises OSError when the program cannot be started.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )
    on_start(proc.pid)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc.pid, grace_s=2.0)
        stdout, stderr = proc.communicate()
    finally:
        kill_group(proc.pid, grace_s=2.0)
    return GroupResult(
        None if timed_out else proc.returncode,
        stdout.decode("utf-8", errors="replace"),
        stderr.decode("utf-8", errors="replace"),
        timed_out,
        time.monotonic() - start,
    )
