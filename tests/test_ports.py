"""Free ports (mlci_dagster/providers/ports.py) when two test workers or two sandboxes allocate
side by side: the kernel may offer a port it just offered someone else (nothing is bound to it
until that one's server starts); a reserved port is never handed out twice, across processes,
until its holder's server is listening (it is released) or its holder is gone.

The kernel's offer is made deterministic by replacing `unbound_port`, so the race is not left to
chance: it offers the reserved port first, as it may."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlci_dagster.providers import ports
from mlci_dagster.providers.local import LocalProvider
from mlci_dagster.registry import load_registry
from tests.support.registries import config, http_service, write_registry

ROOT = Path(__file__).resolve().parent.parent
HOLDER = ("import sys; from mlci_dagster.providers.ports import reserve_free_port; "
          "r = reserve_free_port(); print(r.port, flush=True); sys.stdin.read()")


def kernel_offering(first: int) -> Callable[[], int]:
    """`unbound_port` offering `first` before whatever the kernel gives; records its offers."""
    real = ports.unbound_port
    offers: list[int] = []

    def offer() -> int:
        offers.append(first if not offers else real())
        return offers[-1]

    offer.offers = offers  # type: ignore[attr-defined]
    return offer


@pytest.fixture
def other_worker() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Another process holding a reservation, as a second test worker does while its server
    starts; it lets go when its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    yield holder, port
    if holder.poll() is None:
        holder.kill()
        holder.wait()


def test_a_port_reserved_by_another_process_is_not_handed_out_until_it_lets_go(
        other_worker, monkeypatch):
    holder, taken = other_worker
    kernel = kernel_offering(taken)
    monkeypatch.setattr(ports, "unbound_port", kernel)

    port = ports.allocate_free_port()

    assert kernel.offers[0] == taken  # the kernel did offer it again: the race was there
    assert port != taken

    holder.communicate("", timeout=30)  # its server listens now, or it is gone: released
    kernel.offers.clear()
    with ports.reserve_free_port() as again:
        assert again.port == taken


def test_two_reservations_in_one_process_never_share_a_port(monkeypatch):
    with ports.reserve_free_port() as first:
        monkeypatch.setattr(ports, "unbound_port", kernel_offering(first.port))
        second = ports.reserve_free_port()

    assert second.port != first.port
    assert not first.held and second.held
    second.release()
    second.release()  # idempotent
    assert not second.held


def test_threads_allocating_at_once_get_distinct_ports(monkeypatch):
    """Eight threads, the kernel offering every one of them the same port first."""
    with ports.reserve_free_port() as decoy:
        decoy_port = decoy.port
    monkeypatch.setattr(ports, "unbound_port", kernel_offering(decoy_port))
    got: list[int] = []
    start = threading.Barrier(8)

    def allocate() -> None:
        start.wait()
        got.append(ports.reserve_free_port().port)

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(got) == 8 and len(set(got)) == 8, got


def test_a_port_a_server_listens_on_is_not_reserved_again(monkeypatch):
    """Reserved after a server bound it (its reservation already released): refused."""
    with socket.socket() as server:
        server.bind((ports.HOST, 0))
        server.listen()
        busy = server.getsockname()[1]
        monkeypatch.setattr(ports, "unbound_port", kernel_offering(busy))

        assert ports.reserve_free_port().port != busy


def test_allocate_free_port_keeps_its_reservation_for_the_hold(other_worker, monkeypatch):
    """A caller that only gets the number (a fixture starting a server on it) is protected for
    `hold_s`; once that has passed, the next allocation lets the port go."""
    holder, _ = other_worker
    holder.communicate("", timeout=30)
    port = ports.allocate_free_port(hold_s=3600)
    monkeypatch.setattr(ports, "unbound_port", kernel_offering(port))
    assert ports.reserve_free_port().port != port

    short = ports.allocate_free_port(hold_s=0)
    ports.allocate_free_port()  # lets `short` go: its hold has passed
    monkeypatch.setattr(ports, "unbound_port", kernel_offering(short))
    with ports.reserve_free_port() as again:
        assert again.port == short


def test_a_local_sandbox_holds_its_ports_until_its_services_listen(tmp_path, monkeypatch):
    root = write_registry(tmp_path / "reg", [config("c", sandbox={"services": [
        http_service("web"), http_service("api")]})])
    spec = load_registry(root).configs["c"].config.sandbox
    provider = LocalProvider(tmp_path / "home")

    handle = provider.create(spec, config="c", engine="e1", run_id="r1", engine_variables={},
                             teardown_s=30)
    try:
        for port in handle.ports.values():  # between start and listen: reserved
            monkeypatch.setattr(ports, "unbound_port", kernel_offering(port))
            assert ports.reserve_free_port().port != port
        monkeypatch.undo()

        provider.wait_until_ready(handle, spec, 30)

        for port in handle.ports.values():  # listening: the kernel keeps it; no lock is left
            fd = ports._lock(port)
            assert fd is not None, f"port {port} still reserved after the sandbox is ready"
            os.close(fd)
    finally:
        report = provider.destroy(handle, timeout_s=30)
    assert report.clean, report
