"""Servers on loopback for tests and benchmarks: processes killed whole on exit, the environment
their clients inherit, and images pushed to a real registry over the OCI distribution API (no
docker client)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import psutil
import requests

from mlci_dagster.providers import processes

REGISTRY_BIN = Path("/usr/bin/docker-registry")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
STOP_GRACE_S = 60
RESOURCE_TRACKER = "multiprocessing.resource_tracker"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def background(argv: list[str], log: Path, env: dict[str, str] | None = None
               ) -> Iterator[subprocess.Popen]:
    """Runs argv in its own process group; on exit kills the whole group, even on failure."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop_group(proc)


@contextlib.contextmanager
def environment_set(values: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """os.environ with `values` set and `unset` removed (what child processes inherit),
    restored on exit."""
    saved = {name: os.environ.get(name) for name in [*values, *unset]}
    os.environ.update(values)
    for name in unset:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def group_members(pgid: int) -> list[tuple[int, str]]:
    """The live (not zombie) processes of a process group, with their command lines."""
    members = []
    for pid in processes.group_members(pgid):
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            members.append((pid, " ".join(psutil.Process(pid).cmdline())))
    return members


def _wait_group_gone(pgid: int, deadline: float) -> None:
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to the group, on which Dagster shuts down cleanly, and a grace for the whole group,
    not only its leader: `dagster-daemon` and `dagster-webserver` return while their code server
    (`dagster api grpc`) still waits for its runs to end. That server holds, per run, a
    multiprocessing Event and Queue of the spawn context, named POSIX semaphores
    (/dev/shm/sem.mp-*) that only its exit or its multiprocessing resource tracker unlinks. So
    what is left after the grace is SIGKILLed, but the resource trackers last: they unlink the
    semaphores of the processes they served once those are dead, and then exit by themselves."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    _wait_group_gone(proc.pid, deadline)
    for pid, cmdline in group_members(proc.pid):
        if RESOURCE_TRACKER not in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _wait_group_gone(proc.pid, time.monotonic() + 10)
    with contextlib.suppress(ProcessLookupError):  # anything that outlived all that
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def push_image(base: str, repo: str, tag: str, layer: bytes) -> str:
    """Uploads a config and a layer blob, then tags a manifest; returns the manifest digest."""
    config_blob = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha256(layer)]}}).encode()
    for blob in (config_blob, layer):
        started = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=10)
        if started.status_code != 202:
            raise RuntimeError(f"blob upload to {base}/{repo}: {started.status_code} "
                               f"{started.text}")
        done = requests.put(urljoin(base, started.headers["Location"]),
                            params={"digest": sha256(blob)}, data=blob, timeout=10,
                            headers={"Content-Type": "application/octet-stream"})
        if done.status_code != 201:
            raise RuntimeError(f"blob put to {base}/{repo}: {done.status_code} {done.text}")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer), "size": len(layer)}],
    }).encode()
    put = requests.put(f"{base}/v2/{repo}/manifests/{tag}", data=manifest, timeout=10,
                       headers={"Content-Type": OCI_MANIFEST})
    if put.status_code != 201 or put.headers.get("Docker-Content-Digest") != sha256(manifest):
        raise RuntimeError(f"manifest put {base}/{repo}:{tag}: {put.status_code} {put.text}")
    return sha256(manifest)
