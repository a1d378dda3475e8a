"""Pure helpers: templating, redaction, status of a lifecycle."""

from __future__ import annotations

import pytest

from mlci_dagster.common.dotted import dig
from mlci_dagster.common.redact import Redactor, looks_like_credential
from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.stages.outcome import StageClock, skipped
from mlci_dagster.stages.results import first_failure
from mlci_dagster.vocabulary import (
    FailureKind,
    Stage,
    failed_stage_of,
    lifecycle_status,
    partition_key,
    split_partition_key,
)


def test_render_resolves_nested_references_and_keeps_kept_roots():
    context = {"services": {"web": {"url": "http://127.0.0.1:9"}}, "env": {"T": "x"}}

    assert render(["${services.web.url}/a", {"k": "${env.T}"}], context) == [
        "http://127.0.0.1:9/a", {"k": "x"}]
    assert render("${env.T}", context, keep=frozenset({"env"})) == "${env.T}"


def test_render_names_the_missing_reference():
    with pytest.raises(TemplateError, match=r"\$\{services.db.url\}: no 'db' here"):
        render("${services.db.url}", {"services": {"web": {}}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("value hunter2-secret here", "value *** here"),
        ("password=abc123", "password=***"),
        ("Authorization: Bearer eyJhbGci", "Authorization: Bearer ***"),
        ("postgresql://app:pa55@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("key AKIAABCDEFGHIJKLMNOP", "key ***"),
        ("nothing to hide", "nothing to hide"),
    ],
)
def test_redactor_masks_declared_values_and_credential_shapes(text, expected):
    assert Redactor(["hunter2-secret"]).text(text) == expected


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("DB_PASSWORD", True),
        ("db_password", True),  # case does not matter
        ("PGPASSWORD", True),  # a word ending in PASSWORD, PASSWD, SECRET or TOKEN
        ("MYSQL_ROOT_PASSWD", True),
        ("GITHUB_TOKEN", True),
        ("HF_TOKEN", True),
        ("AWS_SESSION_TOKEN", True),
        ("CLIENT_SECRET", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("OPENAI_API_KEY", True),
        ("APIKEY", True),
        ("SSH_KEY", True),
        ("KEY", True),
        ("DB_PASS", True),
        ("MONKEY", False),  # KEY only as a whole word (or API_KEY, APIKEY)
        ("HOCKEY_TEAM", False),
        ("KEYBOARD_LAYOUT", False),
        ("TOKENIZERS_PARALLELISM", False),  # TOKEN only as a word or a word's end
        ("SECRETARY", False),
        ("PASSENGER_COUNT", False),
        ("HOME", False),
        ("AWS_REGION", False),
    ],
)
def test_credential_names_are_words_of_the_variable_name(name, credential):
    assert looks_like_credential(name) is credential


def test_redactor_from_env_masks_credential_named_variables_never_listed():
    environ = {"LISTED": "listed-value", "MLCI_STRAY_TOKEN": "stray-value-123",
               "FEATURE_TOKEN_ENABLED": "true", "HOME": "/home/someone",
               "TOKENIZERS_PARALLELISM": "false"}

    redactor = Redactor.from_env(["LISTED"], environ)

    assert redactor.text("listed-value stray-value-123 /home/someone") == "*** *** /home/someone"
    # A flag is not a credential: masking every "true" and "false" would shred the logs.
    assert redactor.text("enabled: true, parallel: false") == "enabled: true, parallel: false"


def test_error_summary_is_redacted_before_it_is_cut():
    secret = "s" * 20
    clock = StageClock(Stage.PIPELINE_RUNS, Redactor([secret]))
    # The secret straddles the 500-character cut: no part of it may survive.
    # Cut first, its last characters would survive: the kept tail begins inside the secret.
    outcome = clock.failed(FailureKind.PRODUCT, "service 'api' failed\n" + "x" * 600 + secret
                           + "y" * 465)

    assert len(outcome.error_summary) <= 500
    assert "s" not in outcome.error_summary.removeprefix("service")
    assert outcome.error_summary.startswith("service 'api' failed\n…\n")
    assert outcome.error_summary.endswith("***" + "y" * 465)


def test_lifecycle_status_names_the_first_failing_stage():
    clock = StageClock(Stage.SANDBOX)
    outcomes = [StageClock(Stage.IMAGE).passed(), clock.failed(FailureKind.INFRA, "boom"),
                skipped(Stage.PIPELINE_RUNS, "sandbox did not pass"),
                StageClock(Stage.TEARDOWN).failed(FailureKind.INFRA, "leak")]

    first = first_failure(outcomes)

    assert first.stage is Stage.SANDBOX
    assert lifecycle_status(first.stage) == "fail-sandbox"
    assert failed_stage_of("fail-sandbox") is Stage.SANDBOX
    assert first_failure(outcomes[:1]) is None and lifecycle_status(None) == "pass"


def test_partition_key_round_trips_and_rejects_other_shapes():
    assert partition_key("python-train", "sqlite") == "python-train|sqlite"
    assert split_partition_key("python-train|sqlite") == ("python-train", "sqlite")
    with pytest.raises(ValueError, match="expected 'config|engine'"):
        split_partition_key("python-train")


def test_dig_reads_dotted_paths_and_reports_where_it_stopped():
    body = {"run": {"data": {"metrics": [{"key": "rmse"}]}}}
    assert dig(body, "run.data.metrics.0.key") == "rmse"
    assert dig(body, "run.info", None) is None
    with pytest.raises(KeyError, match="stopped at 'info'"):
        dig(body, "run.info.status")


@pytest.mark.parametrize(
    ("tags", "trigger"),
    [
        ({"mlci/trigger": "sensor", "dagster/backfill": "b1"}, "sensor"),
        ({"dagster/backfill": "abcd"}, "backfill"),
        ({"dagster/schedule_name": "nightly"}, "schedule"),
        ({"dagster/sensor_name": "image_pushed"}, "sensor"),
        ({}, "manual"),
    ],
)
def test_trigger_is_read_from_run_tags(tags, trigger):
    from mlci_dagster.vocabulary import trigger_of

    assert trigger_of(tags) == trigger


def test_the_results_description_shows_every_lifecycle_status_in_the_dagster_ui():
    """Dagster's UI renders an asset's description as Markdown, where a bare `<stage>` is an
    HTML tag and vanishes: the page read "pass or fail-."."""
    from html.parser import HTMLParser

    import dagster as dg
    from markdown_it import MarkdownIt

    from mlci_dagster.assets.lifecycle import lifecycle_assets
    from mlci_dagster.assets.partitions import lifecycle_partitions

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.shown = ""

        def handle_data(self, data: str) -> None:
            self.shown += data

    description = lifecycle_assets(lifecycle_partitions(["e1"])).descriptions_by_key[
        dg.AssetKey("results")]
    page = Text()
    page.feed(MarkdownIt("commonmark").render(description))

    for status in ("pass", "fail-<stage>", "skip", "canceled"):
        assert status in page.shown, page.shown


@pytest.mark.parametrize("name", ["local", "kubernetes", "aws-sagemaker", "gcp-tpu-vm"])
def test_every_provider_in_the_one_table_implements_the_whole_protocol(name):
    """registry.base.PROVIDERS is where a provider is named; its class answers to that name
    and has every verb of the Protocol, build_provider's and the janitor's included."""
    from mlci_dagster.providers.base import Provider, provider_class
    from mlci_dagster.registry.base import PROVIDERS

    cls = provider_class(name)
    assert name in PROVIDERS and cls.name == name
    verbs = [v for v in dir(Provider) if not v.startswith("_") and callable(getattr(Provider, v))]
    assert {"create", "destroy", "list_live", "from_settings", "settings_of"} <= set(verbs)
    assert [v for v in verbs if not callable(getattr(cls, v, None))] == []
