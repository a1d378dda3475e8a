"""Draws docs/ml-platform-tests-grid.png: the ML example's python-train run twice for real on
both engines (`mlci run --config python-train`, then again with MLCI_DEMO_BREAK=1, which fails
one of its pytest tests on purpose), the grid written (`mlci report --html`), its sqlite row's
tests expanded in headless Chromium and the failing test's cell hovered; headless Chromium draws
no tooltip, so the cell's own title is drawn in where a person would see it.

Run: .venv/bin/python scripts/tests_grid_screenshot.py [--out docs/ml-platform-tests-grid.png]
     [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from mlci_dagster.common.chromium import find_chromium, launch_args

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "examples" / "ml-platform"
TOOLTIP = """(cell) => {
  const box = cell.getBoundingClientRect();
  const tip = document.createElement('div');
  tip.textContent = cell.getAttribute('title');
  tip.style.cssText = 'position:absolute;z-index:9;font:12px system-ui,sans-serif;' +
    'background:#fff;border:1px solid #8c959f;box-shadow:1px 2px 4px #0003;' +
    'padding:3px 6px;white-space:pre;left:' + (box.left + window.scrollX + 8) + 'px;top:' +
    (box.bottom + window.scrollY + 4) + 'px';
  document.body.appendChild(tip);
}"""


def mlci(home: Path, *args: str, check: bool = True, **env: str) -> None:
    subprocess.run([sys.executable, "-m", "mlci_dagster.cli", "--registry", str(REGISTRY), *args],
                   check=check, env={**os.environ, "DAGSTER_HOME": str(home),
                                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                    **env})


def screenshot(page_path: Path, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=launch_args())
        page = browser.new_page(viewport={"width": 1400, "height": 800}, device_scale_factor=1)
        page.goto(page_path.as_uri())
        page.locator("tr", has_text="sqlite").locator("button.tg").first.click()
        failing = page.locator("tr.test.p0", has_text="test_demo_model").locator(
            "span.cell").first
        failing.hover()
        page.evaluate(TOOLTIP, failing.element_handle())
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "ml-platform-tests-grid.png"))
    parser.add_argument("--keep", metavar="DIR", help="keep the DAGSTER_HOME here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(args.keep or scratch)
        mlci(home, "run", "--config", "python-train", MLCI_DEMO_BREAK="")
        # The second batch fails on purpose (one test), so `mlci run` exits 1.
        mlci(home, "run", "--config", "python-train", check=False, MLCI_DEMO_BREAK="1")
        mlci(home, "report", "--html", str(home / "html"))
        screenshot(home / "html" / "grid.html", Path(args.out))
    print(args.out)


if __name__ == "__main__":
    main()
