"""Pytest hooks and shared fixtures: a real Dagster instance in a temporary DAGSTER_HOME, the
`needs(service)` mark and opt-in `slow` tests, an S3 bucket on moto's server. The helpers tests
import are in tests/support: registries written on the fly (registries.py); running partitions
and reading their records, stage details and leaks over real processes, ports and directories
(runs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import dagster as dg
import pytest

from tests.support.aws_proxy import FAKE_CREDENTIALS, REAL_CREDENTIALS, moto_server
from tests.support.services import MARK, require_marked

SLOW = os.environ.get("MLCI_SLOW") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}(name): runs a system service (tests/support/services.py): skipped "
        "where it is missing, a failure under CI=true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests repeat, on the same real service, a path another test covers in CI: an
    opt-in (MLCI_SLOW=1), so skipped in CI too."""
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow: a second case of a covered path; set MLCI_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `needs(service)` whose service is missing is skipped, or fails in CI,
    before its fixtures try to start the service."""
    require_marked(item)


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path):
    with dg.DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def kube():
    """The emulated Kubernetes API server, wanting a token (its kubeconfig() writes the
    admin's), with its controller: (server, controller)."""
    from tests.support.kube_controller import KubeController
    from tests.support.kube_wire import KubeApiServer

    with KubeApiServer(authentication=True) as server, \
            KubeController(server, interval_s=0.05) as controller:
        yield server, controller
        assert controller.errors == []


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's S3 on loopback with a bucket `evidence`; the standard chain's fake credentials."""
    for name in REAL_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with moto_server(tmp_path / "moto.log") as url:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket="evidence")
        yield url, client
