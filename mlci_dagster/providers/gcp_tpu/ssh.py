"""Commands on a VM over SSH (paramiko): each in a process group of its own on the VM, its output
streamed redacted into a log past an OutputWatcher, and at the timeout (or when the VM is going
away) the whole remote group killed, as `providers/processes.run_group` does on this machine;
and the files a command left there, fetched over SFTP on the same login (`fetch_files`).

The environment reaches the remote shell on its standard input, never its command line, so
secret values stay out of the VM's process table. Commands run in the login's home directory
(the remote shell's own), which is where a relative path given to `fetch_files` starts too."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import posixpath
import shlex
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from mlci_dagster.common.redact import NO_SECRETS, Redactor
from mlci_dagster.providers.base import report_copy_path
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


class FetchError(Exception):
    """A file on the VM that could not be listed, read or copied here, or is too big."""


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


# --- files the commands left on the VM -------------------------------------------------------

GLOB_MAGIC = frozenset("*?[")
COPY_CHUNK_BYTES = 256 * 1024


def fetch_files(target: SshTarget, pattern: str, into: Path, *, max_files: int,
                max_bytes: int) -> list[Path]:
    """The regular files on the VM matching `pattern`, copied over SFTP into `into` (created)
    under their whole remote path (`/home/mlci/out/a.xml` as `into/home/mlci/out/a.xml`), the
    first `max_files` of them by remote path, sorted; [] when none matches.

    `pattern` is absolute, or relative to the login's home directory (where `run_remote`'s
    commands run). Any of its components may hold the wildcards of `fnmatch` (`*`, `?`,
    `[...]`), matched against that directory's listing as a shell does (a leading `.` only
    explicitly); there is no `**` recursion (it is a `*`), no `~` and no brace expansion.

    Each file's size is read by `stat` before it is copied, and counted as it is: more than
    `max_bytes` is a FetchError naming the file and its size. Raises SshError when the VM
    cannot be reached or serves no SFTP, FetchError naming `user@host:path` for what cannot
    be listed or read; the connection is closed and what was copied by then removed."""
    where = f"{target.user}@{target.host}"
    copied: list[Path] = []
    client = connect(target)
    try:
        try:
            sftp = client.open_sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"ssh {where}:{target.port}: SFTP is not available "
                           f"({str(exc) or type(exc).__name__})") from exc
        with sftp:
            sftp.get_channel().settimeout(target.connect_timeout_s)  # a hung VM fails, in time
            with _on_vm(where, "~"):
                home = sftp.normalize(".")
            for remote in _matches(sftp, where, posixpath.join(home, pattern)):
                if len(copied) == max_files:
                    break
                with _on_vm(where, remote):
                    size = _regular_file_size(sftp, remote)
                if size is None:
                    continue  # gone since it was listed, or not a file
                if size > max_bytes:
                    raise FetchError(f"{where}:{remote}: {size} bytes, over the limit of "
                                     f"{max_bytes} bytes for one file")
                copied.append(_copy(sftp, where, remote, size, into, max_bytes))
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise
    finally:
        client.close()
    return copied


@contextlib.contextmanager
def _on_vm(where: str, path: str, doing: str = "could not be read") -> Iterator[None]:
    """SFTP's errors (a status, a timeout, a dropped connection) as a FetchError saying
    which file, on which VM, and why: never a traceback."""
    try:
        yield
    except (OSError, EOFError, paramiko.SSHException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise FetchError(f"{where}:{path}: {doing}: {reason}") from exc


def _missing(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ENOTDIR)


def _regular_file_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    """The size of the regular file at `path` (a symbolic link followed); None if there is
    none."""
    try:
        attributes = sftp.stat(path)
    except OSError as exc:
        if _missing(exc):
            return None
        raise
    if attributes.st_mode is None or not stat.S_ISREG(attributes.st_mode):
        return None
    return attributes.st_size or 0


def _is_directory(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        mode = sftp.stat(path).st_mode
    except OSError as exc:
        if _missing(exc):
            return False
        raise
    return mode is not None and stat.S_ISDIR(mode)


def _matches(sftp: paramiko.SFTPClient, where: str, pattern: str) -> list[str]:
    """The paths `pattern` (absolute) names, sorted: its literal components taken as they are,
    its wildcard ones matched against a listing; whether each is a file is for the caller."""
    candidates = ["/"]
    for part in posixpath.normpath(pattern).strip("/").split("/"):
        if not GLOB_MAGIC & set(part):
            candidates = [posixpath.join(base, part) for base in candidates]
            continue
        found = []
        for base in candidates:
            with _on_vm(where, base, "could not be listed"):
                if not _is_directory(sftp, base):
                    continue
                names = sorted(entry.filename for entry in sftp.listdir_attr(base))
            found += [posixpath.join(base, name) for name in names
                      if fnmatch.fnmatchcase(name, part)
                      and (part.startswith(".") or not name.startswith("."))]
        candidates = found
    return sorted(candidates)


def _copy(sftp: paramiko.SFTPClient, where: str, remote: str, size: int, into: Path,
          max_bytes: int) -> Path:
    """`remote` copied to `into` under its remote path; a file that grows past `max_bytes`
    while it is read is refused. No partial copy is left."""
    local = report_copy_path(remote, into)
    if local is None:
        raise FetchError(f"{where}:{remote}: a path through '..' is not fetched")
    try:
        with _on_vm(where, remote), sftp.open(remote, "rb") as source:
            source.prefetch(size)
            with _written(where, remote, local) as copy:
                copied = 0
                while True:
                    with _on_vm(where, remote):
                        chunk = source.read(COPY_CHUNK_BYTES)
                    if not chunk:
                        break
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise FetchError(f"{where}:{remote}: grew past the limit of {max_bytes} "
                                         "bytes for one file while it was copied")
                    copy.write(chunk)
    except BaseException:
        local.unlink(missing_ok=True)
        raise
    return local


@contextlib.contextmanager
def _written(where: str, remote: str, local: Path) -> Iterator[BinaryIO]:
    """`local`, open for writing (its directory created); what cannot be written here (a full
    disk) is a FetchError too, naming both ends."""
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "wb") as copy:
            yield copy
    except OSError as exc:
        raise FetchError(f"{where}:{remote}: could not be copied to {local}: "
                         f"{exc.strerror or exc}") from exc
