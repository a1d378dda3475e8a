"""Failure injection: SIGKILL of the process executing a lifecycle in the middle of each stage in
turn, then the cleanup layers outside the run (the janitor, which ends the run whose worker is
gone and reaps its sandboxes, and the run-failure sensor). Prints what the crash left and the
leaks found after cleanup per injected stage (goal: 0): processes, busy ports, work directories
and ledger entries of the sandbox, and orphaned image-build or pipeline processes.

Run: .venv/bin/python -m benchmarks.failure_injection
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlci_dagster.vocabulary import STAGES
from tests.support.injection import inject, write_registry


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        registry = write_registry(Path(tmp) / "registry")
        print(f"{'injected stage':<16}{'sandboxes':>10}{'left by crash':>15}"
              f"{'leaks after cleanup':>21}  run")
        for stage in STAGES:
            result = inject(str(stage), Path(tmp) / f"home-{stage}", registry)
            print(f"{stage:<16}{result['sandboxes']:>10}{result['left_by_crash']:>15}"
                  f"{result['leaks']:>21}  {result['run_status'].value}"
                  + (f"  {result['details']}" if result["leaks"] else ""), flush=True)


if __name__ == "__main__":
    main()
