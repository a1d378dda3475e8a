"""Free TCP ports on loopback."""

from __future__ import annotations

import socket
from collections.abc import Collection

HOST = "127.0.0.1"


def allocate_free_port(exclude: Collection[int] = ()) -> int:
    """A port nothing listens on now and that no live sandbox has reserved."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port
    raise RuntimeError("no free port found in 100 attempts")


def port_is_free(port: int) -> bool:
    """True when a server could bind `port` now (as servers do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True
