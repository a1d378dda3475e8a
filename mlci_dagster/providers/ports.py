"""Free TCP ports on loopback, reserved across every process on this machine until a server has
bound them.

Asking the kernel for a free port (bind to port 0) and closing the socket leaves the port free
again: a second process asking next can get the same one, and two servers then race for it.
The caller's server cannot bind while our socket holds the port, so a port handed out is
reserved instead by an exclusive lock on the port's byte of one file (RESERVATIONS, shared by
every process of this user; an open file description lock, so each reservation holds its own
and closing it frees only that one): an allocation skips a port whose byte another holder has
locked, until it is released (once the server is listening, the kernel keeps the port from
everyone) or its holder exits.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Collection
from pathlib import Path

HOST = "127.0.0.1"
RESERVATIONS = Path(tempfile.gettempdir()) / f"mlci-ports-{os.getuid()}.lock"
# How long `allocate_free_port` keeps its reservation: ample for a server started with the port
# to bind it (after which nothing else is handed it anyway).
HOLD_S = 120.0
ATTEMPTS = 100


_live: weakref.WeakSet[PortReservation] = weakref.WeakSet()


class PortReservation:
    """A port no other allocation on this machine is handed while this is held."""

    def __init__(self, port: int, lock_fd: int) -> None:
        self.port = port
        self._lock_fd: int | None = lock_fd
        _live.add(self)

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    def release(self) -> None:
        """Lets other allocations have the port again. Idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the file releases its lock

    __del__ = release  # a reservation dropped unreleased does not hold its port to the end

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PortReservation({self.port}, held={self.held})"


def unbound_port() -> int:
    """A port the kernel says nothing is bound to now (it may hand it out again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# struct flock for F_OFD_SETLK (Linux): l_type, l_whence, l_start, l_len, l_pid (0 for OFD).
_FLOCK = "hh4xqqi4x"


def _lock(port: int) -> int | None:
    """A descriptor of the reservations file holding the lock on `port`'s byte; None if someone
    else holds it. Each call opens the file anew: another thread of this process, or another
    process, is refused alike."""
    fd = os.open(RESERVATIONS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, port, 1, 0))
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another
        os.close(fd)
        return None
    return fd


def reserve_free_port(exclude: Collection[int] = ()) -> PortReservation:
    """A port nothing listens on now, not in `exclude` and not reserved by anyone else; the
    caller holds it until the server it starts on it is listening, then releases it."""
    for _ in range(ATTEMPTS):
        port = unbound_port()
        if port in exclude:
            continue
        fd = _lock(port)
        if fd is None:  # handed out to someone whose server is not listening yet
            continue
        if port_is_free(port):  # still: the lock was not taken after a server bound it
            return PortReservation(port, fd)
        os.close(fd)
    raise RuntimeError(f"no free port found in {ATTEMPTS} attempts")


_held: list[tuple[float, PortReservation]] = []
_held_lock = threading.Lock()


def allocate_free_port(exclude: Collection[int] = (), hold_s: float = HOLD_S) -> int:
    """A port nothing listens on now, not in `exclude` (say, the ports of live sandboxes), kept
    from every other allocation for `hold_s`: for callers that start a server on it and cannot
    say when it is listening. The reservation is released by a later allocation once `hold_s`
    has passed, or when this process exits."""
    now = time.monotonic()
    with _held_lock:
        for expiry, reservation in [entry for entry in _held if entry[0] <= now]:
            reservation.release()
            _held.remove((expiry, reservation))
    reservation = reserve_free_port(exclude)
    with _held_lock:
        _held.append((now + hold_s, reservation))
    return reservation.port


def port_is_free(port: int) -> bool:
    """True when a server could bind `port` now (as servers do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _forget_in_child() -> None:
    """A forked child closes its copies of the reservations, unlocking nothing: a lock lasts
    while any copy is open, so a child living on would otherwise keep its parent's ports."""
    for reservation in list(_live):
        fd, reservation._lock_fd = reservation._lock_fd, None
        if fd is not None:
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
