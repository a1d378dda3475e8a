"""ui_smoke routes of kind `browser`: a single-page app served by a real HTTP server, loaded in
Debian's headless Chromium driven by Playwright. An app whose JavaScript throws answers 200 with
the same shell as a working one, so a `contains` check on the HTML passes both; only the
browser tells them apart. The first test needs Chromium (tests/support/services.py: skipped
where it is missing, a failure in CI); the second runs as a machine without it."""

from __future__ import annotations

import subprocess
import tarfile
import time
from pathlib import Path

import dagster as dg
import yaml

from mlci_dagster.common.chromium import CHROMIUM_ENV
from mlci_dagster.event_log import RESULTS_ASSET
from tests.support.registries import PY, command_pipeline, config, write_registry
from tests.support.runs import assert_no_leaks, run_partition, stage_details
from tests.support.services import CHROMIUM, needs

SHELL = '<!doctype html><html><head><title>Runs</title></head><body><div id="root"></div>' \
        '<script src="app.js"></script></body></html>'
WORKING_APP = ("document.getElementById('root').innerHTML = "
               "'<h1 class=\"ready\">Runs</h1><p>run 42 finished</p>';"
               "console.error('favicon.ico is missing, a known gap');")
BROKEN_APP = "const runs = undefined; runs.map(r => r); // TypeError before anything renders"


def spa(name: str, app: str) -> dict:
    """Config `name`: a static server whose pipeline publishes the shell and `app`."""
    publish = command_pipeline("publish", (
        "import pathlib, sys; d = pathlib.Path(sys.argv[1]); "
        f"(d / 'index.html').write_text({SHELL!r}); (d / 'app.js').write_text({app!r})"))
    publish["command"].append("${sandbox.workdir}")
    return config(name, pipelines=[publish], ui_smoke={"routes": [
        {"service": "web", "path": "/", "contains": ['<div id="root">']},
        {"kind": "browser", "service": "web", "path": "/", "timeout_s": 8,
         "wait_for": {"selector": "h1.ready"}, "contains": ["run 42 finished"],
         "allow_console": ["favicon"]},
    ]}, timeouts={"sandbox_s": 30, "pipeline_runs_s": 60, "ui_smoke_s": 60})


@needs(CHROMIUM)
def test_a_rendering_app_passes_and_one_whose_javascript_throws_fails_ui_smoke(
        dagster_home, instance, tmp_path):
    registry = write_registry(tmp_path / "reg", [spa("working", WORKING_APP),
                                                 spa("broken", BROKEN_APP)])

    working, _ = run_partition(instance, registry, "working|e1")
    broken, record = run_partition(instance, registry, "broken|e1")

    assert working.success
    good = stage_details(instance, working.run_id, "ui_smoke")["routes"]
    assert good[1]["problems"] == [] and good[1]["status"] == 200
    # Allowed: the app's own message, and the browser's failed request for /favicon.ico.
    assert [e.split(" (")[0] for e in good[1]["console_errors"]] == [
        "console.error: favicon.ico is missing, a known gap",
        "console.error: Failed to load resource: the server responded with a status of 404"]
    assert good[1]["console_errors"][1].endswith("/favicon.ico)")
    assert good[1]["latency_ms"] > 0

    assert not broken.success
    assert (record["status"], record["failure_kind"]) == ("fail-ui_smoke", "product")
    routes = stage_details(instance, broken.run_id, "ui_smoke")["routes"]
    assert routes[0]["problems"] == []  # the HTML shell is the same: `contains` passes
    assert routes[1]["problems"] == [
        "selector 'h1.ready' not rendered within 8s",
        "uncaught: TypeError: Cannot read properties of undefined (reading 'map')"]
    assert "uncaught: TypeError" in record["error_summary"]

    # The screenshot: on disk, in the debug bundle, and inline in the results' metadata.
    shot = Path(routes[1]["screenshot"])
    assert shot.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG
    with tarfile.open(record["debug_bundle"]) as bundle:
        assert f"broken.e1/screenshots/{shot.name}" in bundle.getnames()
    [latest] = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=RESULTS_ASSET, asset_partitions=["broken|e1"]), limit=1).records
    shown = latest.asset_materialization.metadata["screenshot_0"].value
    assert shown.startswith(f"![{shot.name}](data:image/jpeg;base64,/9j/")
    # The browser went with the sandbox.
    assert_no_leaks(dagster_home, stage_details(instance, broken.run_id, "sandbox")["handle"])
    # Uploaded to the artifact store beside the logs; not once its route turns it off (an
    # image cannot be redacted): then still taken and kept on the machine, but neither
    # uploaded, nor in the bundle (which travels), nor inline in the metadata.
    assert [a["key"].rsplit("/", 2)[1:] for a in record["artifacts"].values()
            if a["kind"] == "screenshot"] == [["screenshot", shot.name]]
    [path] = (registry / "configs").glob("broken*.yaml")
    broken_config = yaml.safe_load(path.read_text())
    broken_config["ui_smoke"]["routes"][1]["upload_screenshot"] = False
    path.write_text(yaml.safe_dump(broken_config))
    time.sleep(2.5)  # a run reads the registry's files again after 2 s
    again, record = run_partition(instance, registry, "broken|e1")
    assert record["config_id"] == latest.asset_materialization.metadata["record"].value[
        "config_id"]  # the same test
    kept = Path(stage_details(instance, again.run_id, "ui_smoke")["routes"][1]["screenshot"])
    assert kept.read_bytes()[:3] == b"\xff\xd8\xff"
    assert {a["kind"] for a in record["artifacts"].values()} == {"log", "bundle"}
    with tarfile.open(record["debug_bundle"]) as bundle:
        names = bundle.getnames()
    assert f"broken.e1/screenshots/{kept.name}.kept-local" in names
    assert f"broken.e1/screenshots/{kept.name}" not in names
    [latest] = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=RESULTS_ASSET, asset_partitions=["broken|e1"]), limit=1).records
    assert "screenshot_0" not in latest.asset_materialization.metadata


def test_without_chromium_the_check_fails_as_infra_and_validate_says_so(
        dagster_home, instance, tmp_path, monkeypatch):
    registry = write_registry(tmp_path / "reg", [spa("working", WORKING_APP)])
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "no-such-chromium"))

    validate = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(registry),
                               "validate"], capture_output=True, text=True, timeout=60)
    _, record = run_partition(instance, registry, "working|e1")

    assert validate.returncode == 0, validate.stderr  # valid; this machine is not ready
    assert (f"mlci: warning: {registry / 'configs' / 'working.yaml'}: ui_smoke.routes[1]: "
            "kind 'browser' needs Chromium, which this machine does not have") in validate.stderr
    assert (record["status"], record["failure_kind"]) == ("fail-ui_smoke", "infra")
    assert "no Chromium on this machine: install Debian's chromium" in record["error_summary"]
