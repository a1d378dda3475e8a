"""The `mlci` command as a user runs it: real subprocesses on a real DAGSTER_HOME."""

from __future__ import annotations

import json
import os
import subprocess

import dagster as dg

from mlci_dagster.paths import LOCAL_EXAMPLE
from tests.support.registries import PY, config, write_registry


def mlci(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "mlci_dagster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ)


def test_malformed_registry_names_file_and_field_and_registers_nothing(dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("good"),
                                                 config("bad", timeouts={"sandbox_s": -5})])

    sync = mlci("--registry", str(registry), "sync")
    run = mlci("--registry", str(registry), "run")

    assert sync.returncode == run.returncode == 2
    assert f"{registry}/configs/bad.yaml: timeouts.sandbox_s: Input should be greater than 0" \
        in sync.stderr
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("config") == []  # not even the good one
        assert instance.get_runs() == []


def test_sync_adds_and_removes_partitions(dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("a"), config("b")])
    assert mlci("--registry", str(registry), "sync").returncode == 0
    (registry / "configs" / "a.yaml").unlink()

    out = mlci("--registry", str(registry), "sync").stdout

    assert "removed: a" in out
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("config") == ["b"]


def test_run_then_report_prints_one_row_per_partition(dagster_home):
    run = mlci("--registry", str(LOCAL_EXAMPLE), "run", "--config", "static-site")
    report = mlci("--registry", str(LOCAL_EXAMPLE), "report", "--json")

    assert run.returncode == 0, run.stdout + run.stderr
    assert "static-site|sqlite: passed" in run.stdout
    rows = {r["partition"]: r for r in json.loads(report.stdout)["partitions"]}
    assert rows["static-site|sqlite"]["status"] == rows["static-site|jsonfile"]["status"] == "PASS"
    assert rows["static-site|sqlite"]["last"]["status"] == "pass"
    assert rows["jobs-api|sqlite"]["status"] == "PENDING"
    with dg.DagsterInstance.get() as instance:
        jobs = sorted(run.job_name for run in instance.get_runs())
        assert jobs == ["history_update", "lifecycle", "lifecycle"]  # a run per partition
    status = mlci("--registry", str(LOCAL_EXAMPLE), "status", "--json")
    counts = json.loads(status.stdout)
    assert (counts["tested"], counts["untested"], counts["passing"]) == (2, 2, 2)


def test_a_second_mlci_run_on_one_home_prints_no_debug_line(dagster_home):
    """The second run reads the history table back through the IO manager: its "Loading file
    from ..." is Dagster's debug chatter, not for stderr."""
    runs = [mlci("--registry", str(LOCAL_EXAMPLE), "run", "--partitions", "static-site|sqlite")
            for _ in range(2)]

    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "DEBUG" not in run.stderr, run.stderr
    assert "static-site|sqlite: passed" in runs[1].stdout


def test_validate_list_and_missing_dagster_home(tmp_path):
    assert "ok: 3 configs, 2 engines, 6 partitions" in mlci("validate").stdout  # the default
    assert "jobs-api|jsonfile" in mlci("--registry", str(LOCAL_EXAMPLE), "list", "--engine",
                                       "jsonfile").stdout
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "report"], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert (f"no history here: DAGSTER_HOME is not set and {tmp_path}/.dagster_home does not "
            "exist") in done.stderr
    assert not (tmp_path / ".dagster_home").exists()  # reading creates nothing


def test_without_dagster_home_the_default_is_dot_dagster_home_for_every_command(tmp_path):
    """As the README says: `mlci` run from a folder keeps the history in ./.dagster_home, and
    every later command there (and every process it starts) finds it."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}

    def here(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry", str(LOCAL_EXAMPLE),
                               *args], capture_output=True, text=True, env=env, timeout=300,
                              cwd=tmp_path)

    run = here("run", "--partitions", "static-site|sqlite")
    report = here("report", "--json")

    assert run.returncode == 0, run.stdout + run.stderr
    assert f"mlci: DAGSTER_HOME is not set: using {tmp_path}/.dagster_home" in run.stderr
    assert f"on DAGSTER_HOME={tmp_path}/.dagster_home" in run.stdout
    rows = {r["partition"]: r for r in json.loads(report.stdout)["partitions"]}
    assert rows["static-site|sqlite"]["status"] == "PASS"


def test_the_command_line_says_what_it_takes_and_refuses_what_it_cannot_act_on(
        dagster_home, tmp_path):
    registry = write_registry(tmp_path / "reg", [config("a"), config("b")])
    assert mlci("--version").stdout.startswith("mlci-dagster ")
    # --registry is taken after the command too; several --config are all kept.
    listed = mlci("list", "--registry", str(registry), "--config", "a", "--config", "b")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["a|e1", "b|e1"]
    for command in ("run", "report", "status", "list"):
        unknown = mlci("--registry", str(registry), command, "--engine", "mysql")
        assert unknown.returncode == 2, (command, unknown.stdout, unknown.stderr)
        assert f"mlci {command}: error: --engine mysql: not in the registry (known: e1)" \
            in unknown.stderr
    none = mlci("--registry", str(registry), "run", "--config", "a", "--tier", "weekly")
    assert none.returncode == 2 and "--tier weekly: not in the registry" in none.stderr
    for command in ("run", "report", "janitor", "hold", "plan", "validate"):
        page = mlci(command, "--help").stdout
        assert page.count("\n") > 6, page  # a description, and help for each option
        assert "--registry PATH" in page
    run_help = mlci("run", "--help").stdout
    for option in ("--parallel N", "--max-wait SECONDS", "--fail-fast", "--dry-run",
                   "--plan FILE", "--partitions KEYS"):
        assert option in run_help
