"""How long `mlci plan` takes on a large registry, and how much of the matrix a pull request's
tier runs.

A temporary git repository holds a registry (in ci/) of `--configs` configs on `--engines`
engines in `--classes` equivalence classes (configs of one class differ only in name, owners
and `paths:`), each config watching its own folder under src/, each class building its image
from its own inputs. Two commits apart: a 10-file diff touching four configs' folders (two of
them in one class), two classes' image inputs, one config file and three unrelated files.
Printed: `mlci plan --tier pr` as a subprocess (what CI runs: interpreter start, imports, the
registry loaded and validated, git, the matching), the same in process (loading the registry,
then the plan with its git calls, then the matching alone), and the partitions the PR tier runs
against the full matrix, for this diff and for one that changes mlci.yaml (everything). Goal:
the subprocess within 1 s.

Run: .venv/bin/python -m benchmarks.plan [--configs 500] [--engines 4] [--classes 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mlci_dagster.registry import load_registry
from mlci_dagster.tiers.plan import plan_changes, plan_revisions
from tests.support.git_repo import git

TIERS = {"nightly": {"trigger": "nightly", "selection": "all"},
         "pr": {"trigger": "pull_request", "selection": "changed", "representatives": True}}



def config_body(index: int, classes: int) -> dict[str, Any]:
    kind = index % classes
    return {
        "name": f"c{index:03d}", "owners": {"default": f"team-{index % 7}"},
        "tiers": ["nightly", "pr"], "paths": [f"src/svc-{index:03d}/**"],
        "image": {"build": {"command": ["python", f"images/k{kind:02d}/build.py"],
                            "inputs": [f"images/k{kind:02d}/*.py"]}},
        "pipelines": [{"kind": "command", "name": "train",
                       "command": ["python", "-c", f"print('class {kind}')"]}],
        "timeouts": {"pipeline_runs_s": 600},
    }


def write(repo: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)


def make_repository(repo: Path, configs: int, engines: int, classes: int) -> tuple[str, str]:
    """The repository and its two commits: (base, head)."""
    git(repo, "init", "-q", "-b", "main")
    bodies = [config_body(i, classes) for i in range(configs)]
    settings = {"engines": {f"engine-{e}": {} for e in range(engines)}, "tiers": TIERS}
    write(repo, {"ci/mlci.yaml": yaml.safe_dump(settings),
                 **{f"ci/configs/{b['name']}.yaml": yaml.safe_dump(b) for b in bodies},
                 **{f"ci/images/k{k:02d}/build.py": f"# class {k}\n" for k in range(classes)},
                 **{f"src/svc-{i:03d}/main.py": f"# service {i}\n" for i in range(configs)},
                 "docs/a.md": "a\n", "docs/b.md": "b\n", "tools/lint.sh": "true\n"})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    base = git(repo, "rev-parse", "HEAD")
    picked = [3, 3 + classes, configs // 2, configs - 1]  # the first two share a class
    changed_config = bodies[77 % configs] | {"description": "changed"}
    write(repo, {**{f"src/svc-{i:03d}/main.py": "# changed\n" for i in picked},
                 **{f"ci/images/k{k:02d}/build.py": "# changed\n" for k in (10, 42)},
                 f"ci/configs/{changed_config['name']}.yaml": yaml.safe_dump(changed_config),
                 "docs/a.md": "a2\n", "docs/b.md": "b2\n", "tools/lint.sh": "false\n"})
    git(repo, "commit", "-q", "-am", "head")
    return base, git(repo, "rev-parse", "HEAD")


def timed(action: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    seconds, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def figures(seconds: list[float]) -> str:
    return (f"median {statistics.median(seconds) * 1000:7.1f} ms, min "
            f"{min(seconds) * 1000:7.1f} ms, max {max(seconds) * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=500)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlci-plan-") as tmp:
        repo = Path(tmp)
        base, head = make_repository(repo, args.configs, args.engines, args.classes)
        root = repo / "ci"
        cli = [sys.executable, "-m", "mlci_dagster.cli", "--registry", str(root), "plan",
               "--base", base, "--head", head, "--tier", "pr", "--json"]
        subprocess_s, done = timed(lambda: subprocess.run(cli, capture_output=True, text=True,
                                                          check=True), args.repeat)
        from_cli = json.loads(done.stdout)
        load_s, registry = timed(lambda: load_registry(root), args.repeat)
        plan_s, plan = timed(lambda: plan_revisions(registry, base, head, tier="pr"),
                             args.repeat)
        match_s, _ = timed(lambda: plan_changes(registry, plan.changed, tier="pr",
                                                registry_prefix="ci"), args.repeat)
        # No tier: every partition whose files changed, each for itself.
        unfolded = plan_changes(registry, plan.changed, registry_prefix="ci")
        everything = plan_changes(registry, ["ci/mlci.yaml"], tier="pr", registry_prefix="ci")
    assert [p["partition"] for p in from_cli["partitions"]] == [p.key for p in plan.partitions]
    matrix = plan.matrix_partitions
    print(f"registry: {args.configs} configs x {args.engines} engines = {matrix} partitions, "
          f"{args.classes} equivalence classes; diff: {len(plan.changed)} files")
    print(f"mlci plan --tier pr (subprocess)   {figures(subprocess_s)}")
    print(f"  in process: load_registry        {figures(load_s)}")
    print(f"  in process: plan_revisions (git) {figures(plan_s)}")
    print(f"  in process: plan_changes alone   {figures(match_s)}")
    print(f"PR tier runs {len(plan.partitions)} of {matrix} partitions "
          f"({len(plan.partitions) / matrix:.1%}); without representatives "
          f"{len(unfolded.partitions)} ({len(unfolded.partitions) / matrix:.1%}); a change to "
          f"mlci.yaml: {len(everything.partitions)} ({len(everything.partitions) / matrix:.1%})")
    verdict = "within" if statistics.median(subprocess_s) <= 1.0 else "OVER"
    print(f"goal: the subprocess within 1 s: {verdict}")


if __name__ == "__main__":
    main()
