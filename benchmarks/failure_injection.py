"""Failure injection: SIGKILL of the process executing a lifecycle in the middle of each stage in
turn, then the cleanup layers outside the run (the janitor, which ends the run whose worker is
gone and reaps its sandboxes, and the run-failure sensor). Prints, per provider and injected
stage, what the crash left and the leaks found after cleanup (goal: 0): processes, work
directories and ledger entries of the sandbox, and orphaned image-build or pipeline processes;
on the local provider, busy ports; on Kubernetes, the run's namespaces (labelled
app.kubernetes.io/managed-by=mlci) the API server still lists, asked through the `kubernetes`
client, a Terminating one counting as left until it is gone.

The Kubernetes API is an emulation on loopback (tests/support/kube_api.py), started here with
its controller: the provider speaks real HTTP to it through the official client, and it keeps
the objects, runs namespace termination with finalizers and garbage collection, and plays the
kubelet and the Job and Deployment controllers (a Job's pod "runs" for a set time, no container
starts); the service proxy forwards to a local HTTP backend. It does not emulate
authentication, admission, graceful deletion, scheduling or nodes (see its docstring).

Run: .venv/bin/python -m benchmarks.failure_injection [--provider local|kubernetes|all]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlci_dagster.vocabulary import STAGES
from tests.support.injection import (
    emulated_cluster,
    inject,
    write_kubernetes_registry,
    write_registry,
)


@contextlib.contextmanager
def registry_for(provider: str, tmp: Path) -> Iterator[Path]:
    """The registry of config `inject` on `provider` (with its emulated cluster running)."""
    if provider == "local":
        yield write_registry(tmp / "registry")
        return
    with emulated_cluster(tmp / "cluster") as kubeconfig:
        yield write_kubernetes_registry(tmp / "registry", kubeconfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=["local", "kubernetes", "all"], default="all")
    providers = ["local", "kubernetes"] if (chosen := parser.parse_args().provider) == "all" \
        else [chosen]
    print(f"{'provider':<12}{'injected stage':<16}{'sandboxes':>10}{'left by crash':>15}"
          f"{'leaks after cleanup':>21}  run")
    for provider in providers:
        with tempfile.TemporaryDirectory() as tmp, registry_for(provider, Path(tmp)) as registry:
            for stage in STAGES:
                result = inject(str(stage), Path(tmp) / f"home-{stage}", registry)
                print(f"{provider:<12}{stage:<16}{result['sandboxes']:>10}"
                      f"{result['left_by_crash']:>15}{result['leaks']:>21}  "
                      f"{result['run_status'].value}"
                      + (f"  {result['details']}" if result["leaks"] else ""), flush=True)


if __name__ == "__main__":
    main()
