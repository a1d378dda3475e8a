"""Failure injection: SIGKILL of the process executing a lifecycle in the middle of each stage in
turn, then the cleanup layers outside the run (the janitor, which ends the run whose worker is
gone and reaps its sandboxes, and the run-failure sensor). Prints, per provider and injected
stage, what the crash left and the leaks found after cleanup (goal: 0): processes, work
directories and ledger entries of the sandbox, and orphaned image-build or pipeline processes;
on the local provider, busy ports; on Kubernetes, the run's namespaces (labelled
app.kubernetes.io/managed-by=mlci) the API server still lists, asked through the `kubernetes`
client, a Terminating one counting as left until it is gone.

The Kubernetes API is an emulation on loopback (tests/support/kube_wire.py), started here with
its controller: the provider speaks real HTTP to it through the official client, and it keeps
the objects, runs namespace termination with finalizers and garbage collection, and plays the
kubelet and the Job and Deployment controllers (a Job's pod "runs" for a set time, no container
starts); the service proxy forwards to a local HTTP backend. It does not emulate
authentication, admission, graceful deletion, scheduling or nodes (see its docstring).

On `aws-sagemaker`, boto3 speaks to moto's server on loopback (fake credentials from the
environment) through a proxy that gives endpoints the Creating and Deleting time real ones have
(tests/support/sagemaker_api.py); a leak is a model, endpoint config or endpoint tagged with the
run that `list_*` still lists. On `gcp-tpu-vm`, google-cloud-tpu speaks to the loopback Cloud TPU
v2 API (tests/support/tpu_api.py) and pipelines run over SSH on a real sshd standing in for the
VM; a leak is a node labelled with the run that `list_nodes` still lists. A pipeline's process
on that "VM" (this machine) outlives the crash: it is counted in what the crash left, not after
the cleanup, since a real one goes with its node. `killed in` is the stage the kill landed in,
from the run's event log (a stage a provider has little to do in can end before the kill).

Run: .venv/bin/python -m benchmarks.failure_injection
     [--provider local|kubernetes|aws-sagemaker|gcp-tpu-vm|all]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mlci_dagster.vocabulary import STAGES
from tests.support.injection import PROVIDERS, inject, registry_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=[*PROVIDERS, "all"], default="all")
    providers = list(PROVIDERS) if (chosen := parser.parse_args().provider) == "all" \
        else [chosen]
    print(f"{'provider':<15}{'injected stage':<16}{'killed in':<15}{'sandboxes':>10}"
          f"{'left by crash':>15}{'leaks after cleanup':>21}  run")
    for provider in providers:
        with tempfile.TemporaryDirectory() as tmp, registry_on(provider, Path(tmp)) as registry:
            for stage in STAGES:
                result = inject(str(stage), Path(tmp) / f"home-{stage}", registry)
                print(f"{provider:<15}{stage:<16}{result['killed_in']:<15}"
                      f"{result['sandboxes']:>10}{result['left_by_crash']:>15}"
                      f"{result['leaks']:>21}  {result['run_status'].value}"
                      + (f"  {result['details']}" if result["leaks"] else ""), flush=True)


if __name__ == "__main__":
    main()
