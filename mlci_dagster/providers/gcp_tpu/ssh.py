"""Commands on a VM over SSH (paramiko): each in a process group of its own on the VM, its output
streamed redacted into a log past an OutputWatcher, and at the timeout (or when the VM is going
away) the whole remote group killed, as `providers/processes.run_group` does on this machine.

The environment reaches the remote shell on its standard input, never its command line, so
secret values stay out of the VM's process table."""

from __future__ import annotations

import contextlib
import io
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from mlci_dagster.common.redact import NO_SECRETS, Redactor
from mlci_dagster.providers.logpipe import (
    CHUNK_BYTES,
    STDERR,
    STDOUT,
    OutputWatcher,
    RedactingWriter,
    SharedLog,
)

POLL_S = 0.05
KILL_GRACE_S = 1.0
KEY_TYPES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


class SshError(Exception):
    """The VM could not be reached over SSH (or refused the key)."""


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int
    user: str
    private_key: str  # the key's text: never logged, never in a handle
    connect_timeout_s: float = 30.0

    def __repr__(self) -> str:  # keeps the key out of tracebacks and logs
        return f"SshTarget({self.user}@{self.host}:{self.port})"


def load_private_key(text: str) -> paramiko.PKey:
    """The key, whichever of Ed25519, ECDSA or RSA it is (OpenSSH or PEM format)."""
    problems = []
    for key_type in KEY_TYPES:
        try:
            return key_type.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as exc:
            problems.append(f"{key_type.__name__}: {exc}")
    raise SshError("the private key is not an unencrypted Ed25519, ECDSA or RSA key "
                   f"({'; '.join(problems)})")


def connect(target: SshTarget) -> paramiko.SSHClient:
    """A connected client. A fresh VM's host key is unknown until it is read from its guest
    attributes (not done yet), so unknown host keys are accepted."""
    key = load_private_key(target.private_key)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(target.host, port=target.port, username=target.user, pkey=key,
                       timeout=target.connect_timeout_s, banner_timeout=target.connect_timeout_s,
                       auth_timeout=target.connect_timeout_s, allow_agent=False,
                       look_for_keys=False)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        reason = str(exc) or type(exc).__name__
        raise SshError(f"ssh {target.user}@{target.host}:{target.port}: {reason}") from exc
    return client


def wait_for_ssh(target: SshTarget, deadline: float, interval_s: float = 2.0) -> float:
    """Connects until a session runs `true` or `deadline` (time.monotonic()); returns the
    seconds it took. Raises SshError with the last reason."""
    start = time.monotonic()
    while True:
        try:
            client = connect(target)
            try:
                _, stdout, _ = client.exec_command("true", timeout=target.connect_timeout_s)
                stdout.channel.recv_exit_status()
                return time.monotonic() - start
            finally:
                client.close()
        except (SshError, paramiko.SSHException, OSError) as exc:
            if time.monotonic() + interval_s >= deadline:
                raise SshError(f"{exc} (still, after {time.monotonic() - start:.0f}s)") from exc
        time.sleep(interval_s)


def remote_script(command: list[str] | str, pgid_file: str) -> str:
    """The command line sent over SSH: a shell that leads a new session (so its process group
    is the command's), records its group id, reads its environment from stdin and runs the
    command with no stdin of its own."""
    body = shlex.join(command) if isinstance(command, list) else f"sh -c {shlex.quote(command)}"
    pgid = shlex.quote(pgid_file)
    script = "\n".join([f"echo $$ > {pgid}", 'eval "$(cat)"', f"{body} </dev/null",
                        "status=$?", f"rm -f {pgid}", "exit $status"])
    return f"setsid -w sh -c {shlex.quote(script)}"


def exports(env: dict[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def kill_script(pgid_file: str) -> str:
    """SIGTERM the recorded group, SIGKILL what is left a moment later."""
    pgid = shlex.quote(pgid_file)
    return (f"pg=$(cat {pgid} 2>/dev/null) && [ -n \"$pg\" ] && {{ kill -TERM -- -$pg; "
            f"sleep {KILL_GRACE_S:g}; kill -KILL -- -$pg; }} 2>/dev/null; rm -f {pgid}; true")


@dataclass
class RemoteResult:
    exit_code: int | None  # None when killed (timeout, interruption) or unknown
    timed_out: bool
    interrupted: str  # why the run was cut short by its surroundings ("" if it was not)
    duration_s: float
    log_path: str
    stdout_tail: str
    stderr_tail: str
    killed: str = ""  # what the kill of the remote group said, if it was needed


def run_remote(
    target: SshTarget, command: list[str] | str, env: dict[str, str], *, pgid_file: str,
    timeout_s: float, log_path: Path | str, redactor: Redactor = NO_SECRETS,
    watcher: OutputWatcher | None = None, check: Callable[[], str] | None = None,
    check_every_s: float = 15.0,
) -> RemoteResult:
    """Runs `command` on the VM to completion. At the timeout, or when `check()` returns a
    reason (the node is no longer READY), or when the connection drops, kills the remote group
    and stops. Output streams, redacted, into `log_path` (replaced). Raises SshError when no
    session can be opened."""
    start = time.monotonic()
    deadline = start + timeout_s
    client = connect(target)
    timed_out, interrupted, killed = False, "", ""
    with open(log_path, "w", encoding="utf-8") as file:
        log = SharedLog(file)
        stdout = RedactingWriter(log, STDOUT, redactor, watcher)
        stderr = RedactingWriter(log, STDERR, redactor, watcher)
        try:
            channel = client.get_transport().open_session()  # type: ignore[union-attr]
            channel.exec_command(remote_script(command, pgid_file))
            channel.sendall(exports(env).encode())
            channel.shutdown_write()
        except (paramiko.SSHException, OSError, AttributeError) as exc:
            client.close()
            raise SshError(f"ssh {target.user}@{target.host}:{target.port}: could not start "
                           f"the command: {exc}") from exc
        next_check = start + check_every_s
        try:
            while True:
                moved = _drain(channel, stdout, stderr)
                if channel.exit_status_ready() and not (channel.recv_ready()
                                                        or channel.recv_stderr_ready()):
                    break
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if check is not None and now >= next_check:
                    next_check = now + check_every_s
                    if reason := check():
                        interrupted = reason
                        break
                transport = client.get_transport()
                if (channel.closed and not channel.exit_status_ready()) or (
                        transport is None or not transport.is_active()):
                    interrupted = "the SSH connection was lost"
                    break
                if not moved:
                    time.sleep(POLL_S)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            interrupted = f"the SSH connection failed: {exc}"
        exit_code: int | None = None
        if timed_out or interrupted:
            killed = _kill_remote(client, target, pgid_file)
        else:
            status = channel.recv_exit_status()
            exit_code = status if status >= 0 else None
        with contextlib.suppress(Exception):
            channel.close()
        client.close()
        stdout.close()
        stderr.close()
    return RemoteResult(exit_code, timed_out, interrupted, time.monotonic() - start,
                        str(log_path), stdout.tail, stderr.tail, killed)


def _drain(channel: paramiko.Channel, stdout: RedactingWriter, stderr: RedactingWriter) -> bool:
    moved = False
    while channel.recv_ready():
        stdout.write(channel.recv(CHUNK_BYTES))
        moved = True
    while channel.recv_stderr_ready():
        stderr.write(channel.recv_stderr(CHUNK_BYTES))
        moved = True
    return moved


def _kill_remote(client: paramiko.SSHClient, target: SshTarget, pgid_file: str) -> str:
    """Kills the remote group over the same connection, or a new one if it dropped; says what
    happened (a VM that is gone cannot be reached, and then nothing is left on it either)."""
    for attempt in (client, None):
        fresh = None
        try:
            if attempt is None:
                fresh = connect(SshTarget(target.host, target.port, target.user,
                                          target.private_key, min(target.connect_timeout_s, 10)))
            session = attempt or fresh
            assert session is not None
            _, out, _ = session.exec_command(kill_script(pgid_file), timeout=10 + KILL_GRACE_S)
            out.channel.recv_exit_status()
            return "remote process group killed"
        except (SshError, paramiko.SSHException, OSError, EOFError) as exc:
            reason = f"could not reach the VM to kill the remote process group: {exc}"
        finally:
            if fresh is not None:
                fresh.close()
    return reason
