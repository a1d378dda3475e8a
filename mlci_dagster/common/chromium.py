"""Where Chromium is on this machine, for the browser checks of ui_smoke: `$MLCI_CHROMIUM`, else
Debian's `chromium` (or another Chromium or Chrome on PATH). Nothing is downloaded."""

from __future__ import annotations

import os
import shutil

CHROMIUM_ENV = "MLCI_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless on a machine with no display, no GPU and a closed network (which Chromium's own
# background connections would keep knocking on); --no-sandbox when run as root.
FLAGS = ["--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
INSTALL_HINT = ("install Debian's chromium (apt-get install chromium) or set "
                f"${CHROMIUM_ENV} to a Chromium or Chrome binary")


def find_chromium() -> str | None:
    """The Chromium binary to drive, or None."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def launch_args() -> list[str]:
    return [*FLAGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
