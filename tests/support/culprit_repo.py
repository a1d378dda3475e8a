"""A real git repository for culprit searches: a registry under reg/ whose one config builds its
"image" from reg/platform/ at the commit a run tests, and a model check that commit `breaks`
turns red (ValueError: accuracy below its threshold). `other` commits fail otherwise
(KeyError), as a midpoint broken for another reason does. Used by the tests and by
benchmarks/bisect.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.git_repo import commit, git
from tests.support.registries import http_service

PARTITION = "model|e1"

BUILD = """import os, shutil, pathlib
here = pathlib.Path(__file__).parent
for source in here.glob("*.py"):
    shutil.copy2(source, pathlib.Path(os.environ["MLCI_IMAGE_DIR"]) / source.name)
print("built from commit", os.environ.get("MLCI_COMMIT", "(working tree)"))
"""
MODEL = """import sys
ACCURACY = {accuracy}
CHANGE = {change}
{other}if ACCURACY < 0.9:
    raise ValueError(f"accuracy {{ACCURACY}} below the threshold 0.9 (change {{CHANGE}})")
print("accuracy", ACCURACY)
"""


def settings(**culprit_search: Any) -> dict[str, Any]:
    return {"engines": {"e1": {}}, "tiers": {"nightly": {"trigger": "nightly"}},
            "repository": {"url": "..", "branches": ["main"]},
            **({"culprit_search": culprit_search} if culprit_search else {})}


def model_config() -> dict[str, Any]:
    return {
        "name": "model", "owners": {"default": "ml-team"}, "tiers": ["nightly"],
        "image": {"build": {"command": [sys.executable, "platform/build.py"],
                            "inputs": ["platform/*.py"]}},
        "sandbox": {"services": [http_service()]},
        "pipelines": [{"kind": "command", "name": "evaluate", "timeout_s": 60,
                       "command": [sys.executable, "${image.path}/model.py"]}],
        "ui_smoke": {"routes": [{"service": "web", "path": "/"}]},
        "timeouts": {"sandbox_s": 30, "pipeline_runs_s": 60, "ui_smoke_s": 30},
    }


def make_repo(root: Path, commits: int, breaks: int, other: tuple[int, ...] = (),
              **culprit_search: Any) -> list[str]:
    """`commits` commits on main (1-based: commit 1 first); from commit `breaks` on the model
    check fails; at the `other` commits alone it fails with a KeyError. The SHAs, oldest
    first."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    shas = []
    for n in range(1, commits + 1):
        files = {"reg/platform/model.py": MODEL.format(
            accuracy=0.42 if n >= breaks else 0.95, change=n,
            other="raise KeyError('weights')\n" if n in other else "")}
        if n == 1:
            files |= {"reg/mlci.yaml": yaml.safe_dump(settings(**culprit_search)),
                      "reg/configs/model.yaml": yaml.safe_dump(model_config()),
                      "reg/platform/build.py": BUILD}
        shas.append(commit(root, f"change {n}" + (": lower the accuracy" if n == breaks else ""),
                           files))
    return shas
