"""Draws docs/grid.png: a registry of four configs on two engines, run for real in six batches
(`mlci run` each) while its platform changes (a new image version breaks one config, a flaky
one fails once, another slows down), then the grid page rendered in headless Chromium.

Run: .venv/bin/python scripts/grid_screenshot.py [--out docs/grid.png] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# What each batch changes: the platform version (a new image digest) and each config's mode.
BATCHES = [
    ("1.0", {}),
    ("1.0", {}),
    ("1.1", {"features": "valueerror"}),
    ("1.1", {"features": "valueerror", "export": "timeout"}),
    ("1.2", {"features": "valueerror", "serve-api": "404", "train-small": "slow"}),
    ("1.2", {"features": "valueerror", "serve-api": "404", "train-small": "slow"}),
]
PIPELINE = """
import json, os, random, sys, time, pathlib
mode = json.loads(pathlib.Path(os.environ["MODES"]).read_text()).get(sys.argv[1], "pass")
time.sleep((2.4 if mode == "slow" else 0.6) + random.random() * 0.3)
if mode == "valueerror":
    raise ValueError(f"feature 'age' has {random.randint(3, 40)} nulls, expected 0")
if mode == "timeout":
    time.sleep(30)
if mode != "404":
    (pathlib.Path(sys.argv[2]) / "index.html").write_text("<h1>ok</h1>")
print(f"loss={0.21 + random.random() * 0.02 + (0.05 if mode == 'slow' else 0):.4f}")
"""


def write_registry(root: Path, modes: Path) -> None:
    (root / "configs").mkdir(parents=True)
    (root / "platform").mkdir()
    (root / "platform" / "version.txt").write_text("1.0")
    (root / "platform" / "pipeline.py").write_text(PIPELINE)
    (root / "mlci.yaml").write_text(yaml.safe_dump({"engines": {
        "sqlite": {"description": "runs on SQLite"},
        "postgres": {"description": "runs on PostgreSQL"}}}))
    for name in ("train-small", "features", "export", "serve-api"):
        config = {
            "name": name, "owners": {"default": "platform-team"},
            "image": {"build": {"command": [PY, "-c", "print('built')"],
                                "inputs": ["platform/*"]}},
            "sandbox": {"services": [{"name": "web", "command": [
                PY, "-m", "http.server", "${port}", "--bind", "127.0.0.1", "--directory",
                "${sandbox.workdir}"], "ready": {"http": {"path": "/"}}}]},
            "pipelines": [{"kind": "command", "name": "run", "command": [
                PY, str(root / "platform" / "pipeline.py"), name, "${sandbox.workdir}"],
                "env": {"MODES": str(modes)}, "timeout_s": 8,
                "outputs": {"loss": "loss=([0-9.]+)"}}],
            "ui_smoke": {"routes": [{"service": "web", "path": "/index.html"}]},
            "metrics": {"loss": {"source": "run.loss", "direction": "lower_is_better"}},
            "timeouts": {"sandbox_s": 30, "pipeline_runs_s": 20, "ui_smoke_s": 20},
        }
        (root / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "grid.png"))
    parser.add_argument("--keep", help="build the history in DIR and keep it")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp())
    registry, modes = work / "registry", work / "modes.json"
    write_registry(registry, modes)
    env = {**os.environ, "DAGSTER_HOME": str(work / "home"), "MLCI_REGISTRY": str(registry)}
    for version, changes in BATCHES:
        (registry / "platform" / "version.txt").write_text(version)
        modes.write_text(json.dumps(changes))
        done = subprocess.run([PY, "-m", "mlci_dagster.cli", "run", "--parallel", "2"],
                              env=env, capture_output=True, text=True)
        print(f"batch (platform {version}): exit {done.returncode}", flush=True)
    html = work / "html"
    subprocess.run([PY, "-m", "mlci_dagster.cli", "report", "--html", str(html)], env=env,
                   check=True, capture_output=True)
    from playwright.sync_api import sync_playwright

    from mlci_dagster.common.chromium import find_chromium, launch_args

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(),
                                             args=launch_args())
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((html / "grid.html").as_uri())
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"{args.out} from {html / 'grid.html'}")


if __name__ == "__main__":
    main()
