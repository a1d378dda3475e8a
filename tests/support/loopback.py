"""Servers on loopback for the image-sensor tests and benchmark: processes killed whole on
exit, and images pushed to a real registry over the OCI distribution API (no docker client)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import requests

REGISTRY_BIN = Path("/usr/bin/docker-registry")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Dagster shuts down cleanly on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
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
