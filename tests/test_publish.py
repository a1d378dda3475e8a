"""Links that work from anywhere and the published site, on the default local store and on an
S3 bucket served by moto's server mode (the closest real implementation of S3's wire protocol
here; it serves presigned URLs without checking their signature or expiry, so those are checked
on the URL). The ML example's must-show, every link fetched and the site rendered in Chromium,
is in tests/test_ml_platform.py."""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlparse

import boto3
import requests
import yaml

from mlci_dagster.artifacts.publish import INDEX_KEY, page_key
from mlci_dagster.artifacts.store import LocalStore, S3Store, linker
from mlci_dagster.cli import main
from mlci_dagster.common.aws import AwsSettings
from mlci_dagster.paths import DAGSTER_URL_ENV, ui_base_url
from mlci_dagster.providers.ports import allocate_free_port
from tests.support.registries import leaky_registry
from tests.support.runs import run_partition
from tests.test_artifacts import with_store

TOKEN = "tok-5f1e2d3c4b5a"


def test_the_ui_base_url_is_the_environment_s_else_the_registry_s(monkeypatch):
    monkeypatch.delenv(DAGSTER_URL_ENV, raising=False)
    assert ui_base_url(None) == "http://127.0.0.1:3000"
    assert ui_base_url("https://dagster.example.com") == "https://dagster.example.com"
    monkeypatch.setenv(DAGSTER_URL_ENV, "http://elsewhere:3000")
    assert ui_base_url("https://dagster.example.com") == "http://elsewhere:3000"


def test_links_are_public_presigned_or_file_urls(tmp_path, s3):
    url, client = s3
    local = LocalStore(tmp_path / "store")
    assert local.link("a/e1/r/log/x.log") == (tmp_path / "store" / "a/e1/r/log/x.log").as_uri()
    public = LocalStore(tmp_path / "store", "https://ci.example.com/evidence/")
    assert public.link("a/e1/r/log/x.log") == "https://ci.example.com/evidence/a/e1/r/log/x.log"
    store = S3Store("evidence", "mlci/", AwsSettings("us-east-1", url), link_lifetime_s=3600)
    store.write("a/e1/r/log/x.log", b"loss 0.3\n")
    signed = store.link("a/e1/r/log/x.log")
    assert parse_qs(urlparse(signed).query)["X-Amz-Expires"] == ["3600"]
    fetched = requests.get(signed, timeout=10)
    assert fetched.content == b"loss 0.3\n"
    assert fetched.headers["Content-Type"].startswith("text/plain")  # shown, not downloaded
    # SigV4, whose expiry S3 enforces (moto serves it without checking the signature).
    assert parse_qs(urlparse(signed).query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert store.link_lifetime() == 3600
    assert S3Store("evidence", "", AwsSettings("us-east-1", url), "https://cdn.example.com/"
                   ).link_lifetime() is None


def test_without_credentials_a_view_shows_no_link_rather_than_failing(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                 "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps what it found before
    store = S3Store("evidence", "", AwsSettings("us-east-1", "http://127.0.0.1:9"))
    assert linker(store)("a/e1/r/log/x.log") == ""


def test_publish_writes_the_grid_and_a_page_per_partition_linking_the_evidence(
        instance, dagster_home, tmp_path, monkeypatch, capsys, s3):
    url, client = s3
    monkeypatch.setenv("MLCI_TEST_TOKEN", TOKEN)
    registry = leaky_registry(tmp_path / "reg")
    with_store(registry, {"s3": {"bucket": "evidence", "endpoint_url": url}})
    _, record = run_partition(instance, registry, "leaky|e1")
    capsys.readouterr()
    assert main(["--registry", str(registry), "publish"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"published 2 pages \([\d,]+ bytes\): http://127\.0\.0\.1:\d+/evidence/"
                    r"mlci/site/index\.html\?", out), out
    assert "work for 168 h" in out
    keys = sorted(o["Key"] for o in client.list_objects_v2(
        Bucket="evidence", Prefix="mlci/site/")["Contents"])
    assert keys == [f"mlci/{INDEX_KEY}", f"mlci/{page_key('leaky|e1')}"]
    grid = requests.get(out.split(": ", 1)[1].split()[0], timeout=10)
    assert grid.headers["Content-Type"].startswith("text/html")
    [page_url] = [h.replace("&amp;", "&") for h in re.findall(r'href="([^"]+)"', grid.text)
                  if "/site/partitions/" in h]
    page = requests.get(page_url, timeout=10).text
    assert "leaky|e1" in page and "fail-pipeline_runs" in page
    bundle = next(a for a in record["artifacts"].values() if a["kind"] == "bundle")
    [bundle_url] = [h.replace("&amp;", "&") for h in re.findall(r'href="([^"]+)"', page)
                    if "/bundle/" in h]
    assert requests.get(bundle_url, timeout=10).content == client.get_object(
        Bucket="evidence", Key=f"mlci/{bundle['key']}")["Body"].read()

    # The store down: said, exit 1; nothing else breaks.
    with_store(registry, {"s3": {"bucket": "evidence",
                                 "endpoint_url": f"http://127.0.0.1:{allocate_free_port()}"}})
    time.sleep(2.5)  # the registry's files are read again after 2 s
    assert main(["--registry", str(registry), "publish"]) == 1
    assert "mlci publish: not published: PutObject" in capsys.readouterr().err


def test_a_public_url_makes_the_site_s_address_one_to_bookmark(instance, dagster_home,
                                                               tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLCI_TEST_TOKEN", TOKEN)
    registry = leaky_registry(tmp_path / "reg")
    settings = yaml.safe_load((registry / "mlci.yaml").read_text())
    settings["artifacts"] = {"public_url": "https://ci.example.com/evidence/"}
    settings["ui_base_url"] = "https://dagster.example.com"
    (registry / "mlci.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.delenv(DAGSTER_URL_ENV, raising=False)
    _, record = run_partition(instance, registry, "leaky|e1")
    capsys.readouterr()
    assert main(["--registry", str(registry), "publish"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(": https://ci.example.com/evidence/site/index.html")
    page = (dagster_home / "mlci" / "artifacts" / page_key("leaky|e1")).read_text()
    assert f'href="https://dagster.example.com/runs/{record["run_id"]}"' in page
    log = next(a for a in record["artifacts"].values() if a["key"].endswith(
        f"/log/{record['log_ref'].rsplit('/', 1)[1]}"))
    assert f'href="https://ci.example.com/evidence/{log["key"]}"' in page
