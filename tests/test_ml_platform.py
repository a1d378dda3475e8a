"""The ML platform example (examples/ml-platform) on real services: an MLflow tracking server on
SQLite or PostgreSQL, a Ray head node with its Jobs API, Spark, built into a real venv.

The platform venv takes minutes to build, so one build serves the whole session: a session
fixture builds it into an image home (a session temp folder, or $MLCI_IMAGE_HOME when set, kept
between sessions: the benchmark's default is ~/.cache/mlci-dagster), and each test's fresh
DAGSTER_HOME links its image cache (`mlci/images`) there. The image record holds the venv's
path, so the venv is built once at that stable path, never through a test's link. The failure
examples live only here, in registries made from the example's own files (same image inputs,
so the same image).

Marked `ml_platform` (slow). By default the CI subset runs one partition per real service:
python-train (MLflow), ray-train (Ray) and spark-features (Spark) on SQLite, python-train on
PostgreSQL (the quickest of the three postgres partitions: about 20-23 s here, its model tests
included, against 24-28 s for ray-train and 36-46 s for spark-features), and the two failure
examples, the second of which runs MLflow on a PostgreSQL that never gets ready;
MLCI_ML_PLATFORM_FULL=1 adds the rest of the matrix. python-train's model tests (pytest in the
image's venv, platform/tests/) are checked test by test from their JUnit report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mlci_dagster.junit.read import read_report
from mlci_dagster.registry import load_registry
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from tests.support.runs import assert_no_leaks, processes_of_sandbox, run_partition, stage_details
from tests.support.services import CHROMIUM, needs

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ml-platform"
FULL = os.environ.get("MLCI_ML_PLATFORM_FULL") == "1"
RAY_LINKS = Path("/tmp/mlci-ray")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# The pipeline of each config that prints the MLflow run it logged.
LOGS_THE_RUN = {"python-train": "train", "ray-train": "find-run", "spark-features": "features"}
full_only = pytest.mark.skipif(not FULL, reason="full matrix: set MLCI_ML_PLATFORM_FULL=1")


@pytest.fixture(scope="session")
def ml_image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image cache folder, with the platform image built (or found) in it."""
    configured = os.environ.get("MLCI_IMAGE_HOME")
    home = Path(configured) if configured else tmp_path_factory.mktemp("ml-platform-image-home")
    home.mkdir(parents=True, exist_ok=True)
    ctx = LifecycleContext.create(load_registry(EXAMPLE), "python-train", "sqlite", "image",
                                  home.resolve())
    outcome = build_image(ctx)
    assert outcome.passed, f"the platform image did not build:\n{outcome.error_summary}"
    return ctx.home / "images"


@pytest.fixture
def ml_home(dagster_home: Path, ml_image_cache: Path) -> Path:
    """A fresh DAGSTER_HOME whose image cache is the session's."""
    (dagster_home / "mlci").mkdir()
    (dagster_home / "mlci" / "images").symlink_to(ml_image_cache, target_is_directory=True)
    return dagster_home


def example_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLE / "configs" / f"{name}.yaml").read_text())


def registry_from_example(root: Path, configs: list[dict[str, Any]]) -> Path:
    """A registry with the example's settings and platform files and the given configs."""
    root.mkdir(parents=True)
    shutil.copy2(EXAMPLE / "mlci.yaml", root / "mlci.yaml")
    shutil.copytree(EXAMPLE / "platform", root / "platform",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "configs").mkdir()
    for body in configs:
        (root / "configs" / f"{body['name']}.yaml").write_text(yaml.safe_dump(body))
    return root


def assert_sandbox_gone(home: Path, handle: dict[str, Any]) -> None:
    """No process, port, directory or ledger entry left, nor a Ray session link."""
    assert_no_leaks(home, handle)
    assert processes_of_sandbox(handle["sandbox_id"]) == []
    if RAY_LINKS.exists():
        workdir = handle["workdir"]
        assert [link for link in RAY_LINKS.iterdir()
                if str(link.readlink()).startswith(workdir)] == []


def test_example_registry_is_valid_with_six_partitions():
    registry = load_registry(EXAMPLE)
    assert sorted(registry.configs) == ["python-train", "ray-train", "spark-features"]
    assert registry.engines == ["sqlite", "postgres"]
    assert len(registry.partitions()) == 6
    # One image for every config: the same build, so the same content hash.
    images = {loaded.config.image.model_dump_json() for loaded in registry.configs.values()}
    assert len(images) == 1


def assert_model_tests_passed(record: dict[str, Any]) -> None:
    """python-train's model-tests pipeline: pytest's JUnit report, read into the record, says
    every test of the run and its model passed (the demo failure is skipped), and the report
    kept past the sandbox reads back with every case."""
    counts = record["tests"]
    assert counts["passed"] >= 15, counts
    assert (counts["failed"], counts["errors"], counts["skipped"]) == (0, 0, 1), counts
    assert record["failing_tests"] == [] and record["test_report_problems"] == []
    kept = read_report(Path(record["test_reports"]["model-tests"]))
    assert kept.problem is None and len(kept.cases) == sum(counts.values())
    # Ids from platform/tests/pytest.ini's folder, whatever folder holds the image.
    assert {c.classname for c in kept.cases} == {"test_tracking"}


PARTITIONS = [
    pytest.param("python-train|sqlite", ["train", "model-tests"], id="python-train-sqlite"),
    # The engine's own service in CI: PostgreSQL started in the sandbox, MLflow's store on it.
    pytest.param("python-train|postgres", ["train", "model-tests"], id="python-train-postgres"),
    pytest.param("ray-train|sqlite", ["train", "find-run"], id="ray-train-sqlite"),
    pytest.param("ray-train|postgres", ["train", "find-run"], id="ray-train-postgres",
                 marks=full_only),
    pytest.param("spark-features|sqlite", ["features"], id="spark-features-sqlite"),
    pytest.param("spark-features|postgres", ["features"], id="spark-features-postgres",
                 marks=full_only),
]


@pytest.mark.ml_platform
@pytest.mark.parametrize(("key", "pipelines"), PARTITIONS)
def test_example_partition_passes_on_real_services(ml_home, instance, monkeypatch, key,
                                                   pipelines):
    monkeypatch.delenv("MLCI_DEMO_BREAK", raising=False)  # python-train's failure on purpose
    config, engine = key.split("|")

    result, record = run_partition(instance, EXAMPLE, key)

    assert record["status"] == "pass", record["error_summary"]
    assert result.success
    assert {s: v["status"] for s, v in record["stages"].items()} == dict.fromkeys(
        ["image", "sandbox", "pipeline_runs", "ui_smoke", "teardown"], "pass")
    assert sorted(record["pipelines"]) == sorted(pipelines)
    runs = stage_details(instance, result.run_id, "pipeline_runs")["outputs"]
    assert RUN_ID.match(runs[LOGS_THE_RUN[config]]["run_id"])
    routes = stage_details(instance, result.run_id, "ui_smoke")["routes"]
    assert routes and all(r["status"] == 200 and not r["problems"] for r in routes)
    if config == "python-train":  # MLflow's React app rendered the run in Chromium
        [page] = [r for r in routes if r.get("kind") == "browser"]
        assert page["url"].endswith(f"/runs/{runs['train']['run_id']}")
        assert page["latency_ms"] > 0 and Path(page["screenshot"]).stat().st_size > 10_000
        assert_model_tests_passed(record)
    else:
        assert record["tests"] == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    handle = stage_details(instance, result.run_id, "sandbox")["handle"]
    if engine == "postgres":  # the engine's service joins the sandbox
        assert "service:postgres" in handle["process_groups"]
        assert handle["variables"]["MLFLOW_BACKEND_URI"].startswith("postgresql+psycopg2://")
    else:
        assert handle["variables"]["MLFLOW_BACKEND_URI"].startswith("sqlite:///")
    assert_sandbox_gone(ml_home, handle)


@pytest.mark.ml_platform
@pytest.mark.slow  # Ray is in CI through ray-train; a failing job is tested on the local example
def test_ray_job_that_raises_fails_pipeline_runs_with_the_job_log_tail(
    ml_home, instance, tmp_path
):
    failing = example_config("ray-train")
    failing["name"] = "ray-fail"
    failing["engines"] = ["sqlite"]
    train = failing["pipelines"][0]
    train["submit"]["json"]["entrypoint"] += " --fail"
    registry = registry_from_example(tmp_path / "registry", [failing])

    result, record = run_partition(instance, registry, "ray-fail|sqlite")

    assert not result.success
    assert record["status"] == "fail-pipeline_runs"
    assert record["failure_kind"] == "product"
    assert record["owner"] == "distributed-team"
    # The summary is the last 500 characters: the end of the job's logs, with the error.
    assert "ValueError: planted failure in the trial with C=1.0" in record["error_summary"]
    train = stage_details(instance, result.run_id, "pipeline_runs")["pipelines"][0]
    assert train["details"]["status"] == "FAILED"
    assert re.match(r"job raysubmit_\w+ ended FAILED; logs tail:\n", train["summary"])
    assert record["stages"]["ui_smoke"]["status"] == "skip"
    assert record["stages"]["teardown"]["status"] == "pass"
    assert_sandbox_gone(ml_home, stage_details(instance, result.run_id, "sandbox")["handle"])


@pytest.mark.ml_platform
def test_platform_that_never_gets_ready_fails_sandbox_and_stops_its_database(
    ml_home, instance, tmp_path
):
    stuck = example_config("python-train")
    stuck["name"] = "never-ready"
    stuck["engines"] = ["postgres"]
    # MLflow starts fine, but this experiment never exists: the probe gets 404 until timeout.
    stuck["sandbox"]["services"][0]["ready"] = {
        "http": {"path": "/api/2.0/mlflow/experiments/get-by-name?experiment_name=never"},
        "timeout_s": 30,
    }
    stuck["timeouts"]["sandbox_s"] = 60
    registry = registry_from_example(tmp_path / "registry", [stuck])

    result, record = run_partition(instance, registry, "never-ready|postgres")

    assert not result.success
    assert record["status"] == "fail-sandbox"
    assert record["failure_kind"] == "timeout"
    # The summary is the last 500 characters: MLflow's log tail, its probe answered 404.
    assert "experiment_name=never HTTP/1.1\" 404" in record["error_summary"]
    assert record["stages"]["sandbox"]["duration_s"] >= 30
    assert [record["stages"][s]["status"] for s in ("pipeline_runs", "ui_smoke")] == ["skip"] * 2
    handle = stage_details(instance, result.run_id, "sandbox")["handle"]
    assert set(handle["process_groups"]) == {"service:postgres", "service:mlflow"}
    # PostgreSQL's children each have a process group of their own: all must be gone too.
    assert_sandbox_gone(ml_home, handle)


RUN_QUERY = "query($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }"


@pytest.mark.ml_platform
@needs(CHROMIUM)
def test_every_link_resolves_from_the_s3_store_and_the_published_grid_renders(
        ml_home, instance, tmp_path, monkeypatch, capsys):
    """The example's python-train with one model test broken (MLCI_DEMO_BREAK), its evidence
    in an S3 bucket on moto's server (the closest real implementation of S3's wire protocol
    here; it serves presigned URLs without checking their signatures), the UI links at a real
    dagster-webserver. Every link of the text report, `--json`, the grid, a notification and
    the published site is fetched: the store's answer the bytes the record names (sha256), the
    run links a Dagster that knows the run. The published grid is opened from the store's URL
    in headless Chromium, its partition page too."""
    from playwright.sync_api import sync_playwright

    from mlci_dagster.cli import main
    from mlci_dagster.common.chromium import find_chromium, launch_args
    from mlci_dagster.notify.notifier import NotifierState
    from mlci_dagster.resources.mlci import MlciResource
    from mlci_dagster.sensors.notify import collect
    from tests.support.aws_proxy import FAKE_CREDENTIALS, REAL_CREDENTIALS, moto_server
    from tests.support.dagster_services import graphql, webserver

    for name in REAL_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLCI_DEMO_BREAK", "1")
    monkeypatch.delenv("MLCI_DAGSTER_URL", raising=False)
    config = example_config("python-train")
    config["engines"] = ["sqlite"]
    registry = registry_from_example(tmp_path / "registry", [config])
    with moto_server(tmp_path / "moto.log") as s3, \
            webserver(ml_home, registry, tmp_path / "webserver.log") as ui:
        import boto3

        boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(
            Bucket="evidence")
        settings = yaml.safe_load((registry / "mlci.yaml").read_text())
        settings.update(ui_base_url=ui, artifacts={"s3": {"bucket": "evidence",
                                                          "endpoint_url": s3}})
        (registry / "mlci.yaml").write_text(yaml.safe_dump(settings))
        result, record = run_partition(instance, registry, "python-train|sqlite")
        assert record["status"] == "fail-pipeline_runs" and record["artifacts_pending"] == []
        stored = {a["sha256"]: a for a in record["artifacts"].values()}
        assert {a["kind"] for a in stored.values()} >= {"log", "bundle", "report"}

        def resolves(url: str) -> bytes:
            if url.startswith(ui):
                run_id = url.rsplit("/runs/", 1)[1]
                assert graphql(ui, RUN_QUERY, {"runId": run_id})["runOrError"] == {
                    "__typename": "Run", "status": "FAILURE"}, url
                return b""
            fetched = requests.get(url, timeout=10)
            assert fetched.status_code == 200, (url, fetched.text[:300])
            return fetched.content

        def evidence(url: str) -> str:
            """The kind of the stored artifact the URL serves."""
            return stored[hashlib.sha256(resolves(url)).hexdigest()]["kind"]

        # The text report: the failing stage's log, the bundle, the run.
        capsys.readouterr()
        assert main(["--registry", str(registry), "report"]) == 0
        text = capsys.readouterr().out
        urls = dict(re.findall(r"^\s+(log|debug bundle|run): (\S+)$", text, re.M))
        assert set(urls) == {"log", "debug bundle", "run"}, text
        assert (evidence(urls["log"]), evidence(urls["debug bundle"])) == ("log", "bundle")
        resolves(urls["run"])
        assert urls["run"] == f"{ui}/runs/{result.run_id}"
        # --json: the same three.
        assert main(["--registry", str(registry), "report", "--json"]) == 0
        links = json.loads(capsys.readouterr().out)["partitions"][0]["links"]
        assert (evidence(links["log"]), evidence(links["bundle"])) == ("log", "bundle")
        resolves(links["run"])
        # The grid: every link of the page (the cell's run, and its log and bundle on hover).
        assert main(["--registry", str(registry), "report", "--html", str(tmp_path / "g")]) == 0
        hrefs = re.findall(r'href="([^"]+)"', (tmp_path / "g" / "grid.html").read_text())
        assert sorted(evidence(h) for h in hrefs if not h.startswith(ui)) == ["bundle", "log"]
        assert [resolves(h) for h in hrefs if h.startswith(ui)] == [b""]
        # A notification (webhook and GitHub issue render its links()).
        linking = MlciResource(registry_path=str(registry)).linking()
        (notification,) = collect(instance, NotifierState(), linking.ui_url, link=linking.link)
        sent = notification.links()
        assert set(sent) == {"Dagster run", "log", "debug bundle"}
        assert (evidence(sent["log"]), evidence(sent["debug bundle"])) == ("log", "bundle")
        resolves(sent["Dagster run"])

        # The published site: its URL, every page it links, every link of every page.
        capsys.readouterr()
        assert main(["--registry", str(registry), "publish"]) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith("published 2 pages"), printed
        site = printed.out.splitlines()[0].rsplit(": ", 1)[1]
        grid = resolves(site).decode()
        [page] = [h.replace("&amp;", "&") for h in re.findall(r'href="([^"]+)"', grid)
                  if "/site/partitions/" in h]
        page_links = re.findall(r'href="([^"]+)"', resolves(page).decode())
        kinds = sorted(evidence(h.replace("&amp;", "&")) for h in page_links
                       if not h.startswith(ui) and "/site/" not in h)
        assert kinds == ["bundle", "log"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=find_chromium(),
                                                 args=launch_args())
            try:
                tab = browser.new_page(viewport={"width": 1100, "height": 520})
                assert tab.goto(site).status == 200
                assert "FAILING" in tab.inner_text("body")
                tab.hover(".has-pop")  # the failing cell: its log and bundle links show
                assert tab.locator(".has-pop .pop a").all_inner_texts() == ["log",
                                                                            "debug bundle"]
                tab.screenshot(path=str(tmp_path / "published-grid.png"))
                tab.click("text=python-train")
                tab.wait_for_selector("table.tests")
                assert "test_" in tab.inner_text("table.tests")
                assert tab.locator("table.runs a", has_text="debug bundle").count() == 1
            finally:
                browser.close()
        shots = os.environ.get("MLCI_DOCS_SHOTS")  # where to keep the screenshot for docs/
        if shots:
            shutil.copy2(tmp_path / "published-grid.png", Path(shots) / "published-grid.png")
