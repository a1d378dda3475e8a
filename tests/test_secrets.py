"""Secrets by default: every `${env.NAME}` a registry references is masked unless mlci.yaml
declares it public, and variables whose names look like credentials are always masked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.stages.context import LifecycleContext
from tests.support.registries import PY, command_pipeline, config, write_registry
from tests.support.runs import assert_no_leaks, run_partition, stage_details

# Referenced by the config, declared nowhere: masked because the registry references them.
DB_PASSWORD = "pw-7c6b5a4d3e2f"
WAREHOUSE = "wh-1029384756ab"  # a name that says nothing about being a secret
# In the environment only, never referenced: masked because its name looks like a credential.
STRAY_TOKEN = "stray-5e6f7a8b9c0d"
# Referenced and listed under public_env: shown as it is.
REGION = "region-public-42"

PRINT_ALL = ("import os, sys; print('password', os.environ['DB_PASSWORD'], 'warehouse', "
             "os.environ['WAREHOUSE'], 'stray', os.environ['MLCI_STRAY_TOKEN'], 'region', "
             "os.environ['REGION'], file=sys.stderr, flush=True)")
ENV = {"DB_PASSWORD": "${env.DB_PASSWORD}", "WAREHOUSE": "${env.MLCI_TEST_WAREHOUSE}",
       "REGION": "${env.MLCI_TEST_REGION}"}


def undeclared_registry(root: Path, public_env: list[str]) -> Path:
    """Config `leaky`: a service and a failing pipeline that print every value they were
    passed; mlci.yaml lists no secrets."""
    service = {
        "name": "web",
        "command": [PY, "-c", PRINT_ALL + "; import http.server as h; "
                    "h.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
                    "h.SimpleHTTPRequestHandler).serve_forever()", "${port}"],
        "env": ENV,
        "ready": {"http": {"path": "/"}, "timeout_s": 20},
    }
    failing = command_pipeline("train", PRINT_ALL + "; sys.exit(1)", env=ENV)
    root = write_registry(root, [config("leaky", sandbox={"services": [service]},
                                        pipelines=[failing])])
    if public_env:
        settings = yaml.safe_load((root / "mlci.yaml").read_text())
        (root / "mlci.yaml").write_text(yaml.safe_dump(settings | {"public_env": public_env}))
    return root


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("DB_PASSWORD", DB_PASSWORD), ("MLCI_TEST_WAREHOUSE", WAREHOUSE),
                        ("MLCI_STRAY_TOKEN", STRAY_TOKEN), ("MLCI_TEST_REGION", REGION)):
        monkeypatch.setenv(name, value)


def test_undeclared_env_values_never_reach_logs_metadata_or_the_event_log(
    planted, instance, dagster_home, tmp_path
):
    registry = undeclared_registry(tmp_path / "reg", public_env=["MLCI_TEST_REGION"])

    result, record = run_partition(instance, registry, "leaky|e1")

    assert record["status"] == "fail-pipeline_runs"
    assert f"password *** warehouse *** stray *** region {REGION}" in record["error_summary"]
    handle = stage_details(instance, result.run_id, "sandbox")["handle"]
    assert_no_leaks(dagster_home, handle)
    service_log = Path(handle["log_dir"], "service-web.log").read_text()
    assert f"password *** warehouse *** stray *** region {REGION}" in service_log
    for secret in (DB_PASSWORD, WAREHOUSE, STRAY_TOKEN):
        leaks = [p for p in dagster_home.rglob("*")
                 if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaks == [], secret
        assert all(secret not in str(e) for e in instance.all_logs(result.run_id)), secret


def test_a_referenced_value_is_masked_unless_declared_public(tmp_path, monkeypatch):
    engines = {"e1": {"variables": {"URI": "db://${env.MLCI_DB_HOST}/x"},
                      "services": [{"name": "db", "command": ["${env.MLCI_DB_BIN}"],
                                    "env": {"AREA": "${env.MLCI_AREA}"},
                                    "ready": {"tcp": True}}]}}
    body = config("c", pipelines=[command_pipeline("p", "pass", env={
        "HOME_DIR": "${env.HOME}", "LEVEL": "${env.MLCI_LEVEL}"})])
    root = write_registry(tmp_path, [body], engines=engines, secrets=["MLCI_DECLARED"])
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings | {"public_env": ["HOME",
                                                                              "MLCI_AREA"]}))

    registry = load_registry(root)

    assert registry.secret_names == ("MLCI_DB_BIN", "MLCI_DB_HOST", "MLCI_DECLARED",
                                     "MLCI_LEVEL")
    # What a log line of the lifecycle shows: every value masked but the public ones.
    values = {"MLCI_DB_BIN": "/opt/db-bin-7a1", "MLCI_DB_HOST": "db-host-3c2",
              "MLCI_DECLARED": "declared-9f3", "MLCI_LEVEL": "level-5e4",
              "HOME": "/home/tester-6d5", "MLCI_AREA": "area-public-8b6"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    redactor = LifecycleContext.create(registry, "c", "e1", "run-1", tmp_path / "home").redactor
    line = " ".join(f"{name}={value}" for name, value in values.items())
    assert redactor.text(line) == ("MLCI_DB_BIN=*** MLCI_DB_HOST=*** MLCI_DECLARED=*** "
                                   "MLCI_LEVEL=*** HOME=/home/tester-6d5 "
                                   "MLCI_AREA=area-public-8b6")


@pytest.mark.parametrize(
    ("public_env", "expected"),
    [
        (["DB_PASSWORD"], "public_env[0]: 'DB_PASSWORD' looks like a credential"),
        (["HOME", "github_token"], "public_env[1]: 'github_token' looks like a credential"),
        (["OPENAI_API_KEY"], "public_env[0]: 'OPENAI_API_KEY' looks like a credential"),
        (["MLCI_DECLARED"], "public_env[0]: 'MLCI_DECLARED' is also listed under secrets"),
    ],
)
def test_public_env_may_not_hold_a_credential_or_a_declared_secret(tmp_path, public_env,
                                                                    expected):
    root = write_registry(tmp_path, [config("c")], secrets=["MLCI_DECLARED"])
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings | {"public_env": public_env}))

    with pytest.raises(RegistryError) as caught:
        load_registry(root)

    assert any(expected in p for p in caught.value.problems), caught.value.problems
