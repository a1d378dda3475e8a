"""A throwaway cluster per sandbox (`cluster.create: k3d | kind`), created with the tool's CLI at
create and deleted at destroy.

Each sandbox gets its own cluster, named from the spec's `name` and the sandbox's random id, so
two partitions of one run never share (or delete) each other's cluster. Its kubeconfig is
written to a file of its own; the user's default kubeconfig is never touched.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlci_dagster.common.redact import NO_SECRETS, Redactor

CREATE_TIMEOUT_S = 600.0
MAX_NAME = 32  # k3d's limit on cluster names (kind allows more)
OUTPUT_TAIL = 1500


class ClusterError(Exception):
    """The cluster CLI failed: names the command and quotes the end of its output."""


@dataclass(frozen=True)
class CreatedCluster:
    tool: str  # k3d | kind
    name: str
    kubeconfig: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CreatedCluster:
        return cls(data["tool"], data["name"], data["kubeconfig"])


def cluster_name(prefix: str, sandbox_suffix: str) -> str:
    """`<prefix>-<suffix>`, the prefix cut so the whole fits the tools' limit."""
    room = MAX_NAME - len(sandbox_suffix) - 1
    return f"{prefix[:room].rstrip('-')}-{sandbox_suffix}"


def _run(argv: list[str], timeout_s: float, redactor: Redactor) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise ClusterError(f"{argv[0]} is not installed on this machine (expected on PATH)")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{' '.join(argv)}: no answer in {timeout_s:g}s") from exc
    except OSError as exc:
        raise ClusterError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        output = redactor.text((done.stderr or done.stdout or "").strip())[-OUTPUT_TAIL:]
        raise ClusterError(f"{' '.join(argv)} exited {done.returncode}: {output}")
    return done


def create_cluster(cluster: CreatedCluster, timeout_s: float = CREATE_TIMEOUT_S,
                   redactor: Redactor = NO_SECRETS) -> None:
    """Creates the cluster and writes its kubeconfig to `cluster.kubeconfig`."""
    Path(cluster.kubeconfig).parent.mkdir(parents=True, exist_ok=True)
    if cluster.tool == "k3d":
        _run(["k3d", "cluster", "create", cluster.name, "--wait",
              "--kubeconfig-update-default=false", "--kubeconfig-switch-context=false"],
             timeout_s, redactor)
        _run(["k3d", "kubeconfig", "write", cluster.name, "--output", cluster.kubeconfig],
             60, redactor)
    elif cluster.tool == "kind":
        _run(["kind", "create", "cluster", "--name", cluster.name, "--kubeconfig",
              cluster.kubeconfig, "--wait", f"{int(timeout_s)}s"], timeout_s, redactor)
    else:
        raise ClusterError(f"unknown cluster tool '{cluster.tool}' (expected k3d or kind)")


def cluster_exists(cluster: CreatedCluster, redactor: Redactor = NO_SECRETS) -> bool:
    if cluster.tool == "k3d":
        listed = _run(["k3d", "cluster", "list", "--no-headers"], 60, redactor).stdout
    else:
        listed = _run(["kind", "get", "clusters"], 60, redactor).stdout
    return cluster.name in {line.split()[0] for line in listed.splitlines() if line.strip()}


def delete_cluster(cluster: CreatedCluster, timeout_s: float = 300.0,
                   redactor: Redactor = NO_SECRETS) -> str:
    """Deletes the cluster (a cluster already gone is fine); returns "" when it is verified
    gone, else what is wrong."""
    failure = ""
    try:
        if cluster.tool == "k3d":
            _run(["k3d", "cluster", "delete", cluster.name], timeout_s, redactor)
        else:
            _run(["kind", "delete", "cluster", "--name", cluster.name, "--kubeconfig",
                  cluster.kubeconfig], timeout_s, redactor)
    except ClusterError as exc:
        failure = str(exc)  # perhaps only "no such cluster": the listing decides
    try:
        if cluster_exists(cluster, redactor):
            return failure or f"{cluster.tool} cluster {cluster.name} still listed after " \
                              "its deletion"
    except ClusterError as exc:
        return f"{failure}; {exc}" if failure else str(exc)
    Path(cluster.kubeconfig).unlink(missing_ok=True)
    return ""
