"""Cost and budget: rates per billed resource, a run's estimate, the refusal, the registry's
checks of rates, and how history, reports and the grid treat costs and refused runs."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from mlci_dagster.cost import (
    MonthSpend,
    budget_refusal,
    estimate_run,
    hourly_rate,
    month_end,
    month_start,
    project_partition,
    worst_case_s,
)
from mlci_dagster.history.analysis import analyze, coverage
from mlci_dagster.history.grid import render_grid
from mlci_dagster.history.render import report_table
from mlci_dagster.history.table import append_rows, record_to_row
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.registry.models import BudgetSettings, CostSettings, HistorySettings, TestConfig
from tests.support.registries import config, write_registry
from tests.support.runs import result_record

ROLE = "arn:aws:iam::123456789012:role/sagemaker"


def sagemaker(instance_type: str = "ml.m5.large", count: int = 2) -> dict:
    return {"provider": "aws-sagemaker", "execution_role_arn": ROLE,
            "instance_type": instance_type, "instance_count": count}


def tpu(accelerator: str = "v5litepod-1", spot: bool = True) -> dict:
    return {"provider": "gcp-tpu-vm", "project": "my-project-1", "zone": "us-west4-a",
            "accelerator_type": accelerator, "runtime_version": "v2-alpha-tpuv5-lite",
            "spot": spot, "ssh": {"user": "mlci", "private_key_env": "KEY"}}


def cloud_config(sandbox: dict, **timeouts: float) -> TestConfig:
    kind = "sagemaker_invoke" if sandbox["provider"] == "aws-sagemaker" else "ssh_command"
    pipeline = {"kind": kind, "name": "p", **({"payload": {}} if kind == "sagemaker_invoke"
                                              else {"command": "true"})}
    return TestConfig.model_validate({
        "name": "c", "owners": {"default": "me"}, "image": {"ref": "x"}, "sandbox": sandbox,
        "pipelines": [pipeline], "timeouts": timeouts or {}})


COSTS = CostSettings(hourly_usd={"ml.m5.large": 0.115, "v5litepod-1": 1.2}, spot_multiplier=0.4)


@pytest.mark.parametrize(("sandbox", "rate"), [
    (sagemaker(count=2), 0.23),  # two instances on demand
    (tpu(spot=True), 0.48),  # the spot multiplier
    (tpu(spot=False), 1.2),
    (sagemaker("ml.p3.2xlarge"), None),  # no rate known
])
def test_hourly_rate_of_a_sandbox(sandbox, rate):
    found = hourly_rate(cloud_config(sandbox), COSTS)
    assert found == (pytest.approx(rate) if rate is not None else None)


def test_a_local_sandbox_bills_nothing():
    local = TestConfig.model_validate(config("local"))
    assert hourly_rate(local, COSTS) == 0.0


def test_an_estimate_is_the_median_of_recorded_costs_or_else_the_worst_case():
    tpu_config = cloud_config(tpu(), sandbox_s=600, pipeline_runs_s=1200, ui_smoke_s=60,
                              teardown_s=60)
    assert worst_case_s(tpu_config) == 1920
    worst = estimate_run(tpu_config, 0.48, [])
    assert worst.usd == pytest.approx(0.48 * 1920 / 3600) and "worst case" in worst.basis
    median = estimate_run(tpu_config, 0.48, [0.01, 0.03, 0.02])
    assert median.usd == pytest.approx(0.02) and "median of 3" in median.basis


@pytest.mark.parametrize(("recorded", "running", "estimate", "refused"), [
    (0.50, 0.0, 0.40, False),  # 0.90 fits in 1.00
    (0.50, 0.0, 0.50, False),  # exactly the budget fits
    (0.70, 0.0, 0.40, True),
    (0.40, 0.30, 0.40, True),  # runs in progress count
])
def test_budget_refusal(recorded, running, estimate, refused):
    spend = MonthSpend(recorded, running, 1 if running else 0)
    why = budget_refusal(BudgetSettings(monthly_usd=1.0), spend,
                         estimate_run(cloud_config(tpu()), 1.0, [estimate]))
    assert (why is not None) is refused
    if refused:
        assert "budget.monthly_usd $1" in why and "refused before anything was created" in why
        assert ("in progress" in why) is bool(running)


def test_no_budget_or_a_free_run_is_never_refused():
    spend = MonthSpend(100.0, 0.0, 0)
    free = estimate_run(cloud_config(tpu()), 0.0, [])
    assert budget_refusal(None, spend, estimate_run(cloud_config(tpu()), 1.0, [])) is None
    assert budget_refusal(BudgetSettings(monthly_usd=1.0), spend, free) is None


def test_the_month_is_a_calendar_month_in_utc():
    now = dt.datetime(2026, 12, 4, 15, 30, tzinfo=dt.UTC).timestamp()
    assert month_start(now) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert month_end(now) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()


def test_a_projection_adds_the_estimate_for_each_tick_left():
    projection = project_partition("c|e", cloud_config(tpu()), 0.48, [0.02, 0.04],
                                   [0.02, 0.04], runs_left=10)
    assert projection.runs == 2 and projection.spent_usd == pytest.approx(0.06)
    assert projection.projected_usd == pytest.approx(0.06 + 10 * 0.03)


# --- the registry ----------------------------------------------------------------------------


def cloud_registry(tmp_path, settings: dict, sandbox: dict):
    root = write_registry(tmp_path / "r", [{
        "name": "tpu", "owners": {"default": "me"}, "image": {"ref": "x"}, "sandbox": sandbox,
        "pipelines": [{"kind": "ssh_command", "name": "p", "command": "true"}]}])
    base = yaml.safe_load((root / "mlci.yaml").read_text())
    (root / "mlci.yaml").write_text(yaml.safe_dump({**base, "secrets": ["KEY"], **settings}))
    return root


def test_a_budget_without_a_rate_for_a_billed_resource_names_the_file_and_field(tmp_path):
    root = cloud_registry(tmp_path, {"budget": {"monthly_usd": 1}}, tpu("v5litepod-8"))
    with pytest.raises(RegistryError) as error:
        load_registry(root)
    [problem] = error.value.problems
    assert "configs/tpu.yaml: sandbox.accelerator_type: no rate for 'v5litepod-8' under " \
           "costs.hourly_usd in mlci.yaml" in problem and "a budget is set" in problem


def test_without_rates_or_budget_cost_is_simply_not_tracked(tmp_path):
    registry = load_registry(cloud_registry(tmp_path, {}, tpu("v5litepod-8")))
    assert hourly_rate(registry.configs["tpu"].config, registry.settings.costs) is None


@pytest.mark.parametrize(("settings", "field"), [
    ({"costs": {"hourly_usd": {"v5litepod-1": -1}}}, "costs.hourly_usd.v5litepod-1"),
    ({"costs": {"hourly_usd": {}, "spot_multiplier": 1.5}}, "costs.spot_multiplier"),
    ({"budget": {"monthly_usd": 0}}, "budget.monthly_usd"),
    ({"budget": {}}, "budget.monthly_usd"),
])
def test_bad_costs_or_budget_name_the_field(tmp_path, settings, field):
    with pytest.raises(RegistryError) as error:
        load_registry(cloud_registry(tmp_path, settings, tpu()))
    assert any(f"mlci.yaml: {field}" in p for p in error.value.problems), error.value.problems


# --- history, report and grid ----------------------------------------------------------------


def test_a_refused_run_counts_for_no_rule_and_costs_add_up_per_partition():
    rows = [record_to_row(result_record("tpu|jax", status, 1000.0 + i * 100, cost=cost), i + 1)
            for i, (status, cost) in enumerate([
                ("fail-pipeline_runs", 0.02), ("fail-pipeline_runs", 0.03), ("skip", 0.0),
                ("skip", 0.0)])]
    table = append_rows(None, rows)

    [summary] = analyze(table, ["tpu|jax"], HistorySettings(alert_open_after=2), 2000.0)

    assert summary.runs == 2 and summary.last["status"] == "fail-pipeline_runs"
    assert summary.alert_open and summary.failing_streak == 2  # the skips did not break it
    assert summary.cost_usd == pytest.approx(0.05)
    assert summary.refused_since_last_run == 2
    assert coverage([summary])["failing"] == 1


def test_a_partition_only_ever_refused_is_pending_and_says_so():
    table = append_rows(None, [record_to_row(result_record("tpu|jax", "skip", 1000.0), 1)])
    [summary] = analyze(table, ["tpu|jax"], HistorySettings(), 2000.0)
    assert str(summary.status) == "PENDING" and summary.refused_since_last_run == 1


def test_the_report_and_grid_show_cost_once_any_run_has_one():
    free = append_rows(None, [record_to_row(result_record("a|e", "pass", 1000.0), 1)])
    assert "COST" not in report_table(analyze(free, ["a|e"], HistorySettings(), 2000.0))

    costed = append_rows(None, [record_to_row(result_record("a|e", "pass", 1000.0 + i,
                                                            cost=0.0125), i + 1)
                                for i in range(2)])
    summaries = analyze(costed, ["a|e"], HistorySettings(), 2000.0)
    text = report_table(summaries)
    assert "COST LAST" in text and "$0.0125" in text and "$0.0250" in text
    page = render_grid(costed, summaries, 2000.0)
    assert "$0.0125" in page and "$0.0250" in page
