"""A test whose system service is missing (tests/support/services.py) is skipped on a developer's
machine and fails under CI=true, naming the service and how to install it. The services are
installed here: each is made to look missing (a binary's path, PATH), nothing is uninstalled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlci_dagster.common.chromium import CHROMIUM_ENV
from tests.support import services, tpu_api
from tests.support.services import CHROMIUM, SSHD, require

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tpu_api, "SSHD", tmp_path / "usr" / "sbin" / "sshd")


@pytest.fixture
def no_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv(CHROMIUM_ENV, raising=False)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_sshd_fails_in_ci_naming_it_and_its_install_script(no_sshd, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)

    with pytest.raises(pytest.fail.Exception) as failed:
        require(SSHD)

    assert str(failed.value) == (
        "CI=true and a test service is missing: sshd is not installed on this machine: "
        "/usr/sbin/sshd and ssh-keygen come with Debian's openssh-server: run "
        "scripts/install-test-services.sh as root")


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_a_missing_sshd_is_a_skip_outside_ci(no_sshd, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)

    with pytest.raises(pytest.skip.Exception) as skipped:
        require(SSHD)

    assert str(skipped.value) == SSHD.missing_message()


def test_a_chromium_missing_from_path_fails_in_ci(no_chromium, monkeypatch):
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception) as failed:
        require(CHROMIUM)

    assert "chromium is not installed on this machine: Debian's chromium: run " \
        "scripts/install-test-services.sh as root" in str(failed.value)


def test_every_service_is_installed_on_this_machine(monkeypatch):
    """Where this suite runs (CI, this machine): require passes through for each, CI or not."""
    monkeypatch.setenv("CI", "true")
    for service in services.SERVICES.values():
        require(service)  # neither fails nor skips


MARKED_TEST = '''
from tests.support.services import CHROMIUM, needs

@needs(CHROMIUM)
def test_drives_chromium():
    raise AssertionError("ran without its service")
'''


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), (None, "1 skipped")])
def test_a_marked_test_is_stopped_before_it_runs_by_the_suites_own_hook(tmp_path, ci, outcome):
    """The mark through tests/conftest.py's setup hook, in a pytest of its own: CI=true makes
    the missing service an error of the test's setup (the run fails), else a skip."""
    (tmp_path / "test_marked.py").write_text(MARKED_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", CHROMIUM_ENV, "PYTEST_ADDOPTS")}
    env |= {"PATH": str(tmp_path / "empty-bin"), "PYTHONPATH": str(ROOT),
            **({"CI": ci} if ci else {})}

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "tests.conftest", "-p", "no:xdist",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
         str(tmp_path / "test_marked.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert outcome in done.stdout, done.stdout + done.stderr
    assert "ran without its service" not in done.stdout
    assert "chromium is not installed on this machine" in done.stdout
    assert done.returncode == (1 if ci else 0), done.stdout + done.stderr
