"""The Cloud TPU VM provider against a loopback Cloud TPU v2 API (tests/support/tpu_api.py),
spoken to by the real `google-cloud-tpu` client over plain HTTP, and a real `sshd` on loopback
standing in for the VM: nodes created labelled and READY, `ssh_command` pipelines run for real
(exit codes, expected output, captures, a timeout that kills the remote process group), a
preemption mid-run failing as infra, the JUnit reports an `ssh_command` writes on the VM
fetched over SFTP (globbed there, bounded, each problem named), a verified delete, `list_live`
and the janitor from the API alone, the registry's errors, and the example's lifecycle through
Dagster."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import paramiko
import psutil
import pytest
import yaml
from pydantic import ValidationError

from mlci_dagster import cli
from mlci_dagster.junit.read import read_report
from mlci_dagster.paths import EXAMPLE_REGISTRY
from mlci_dagster.providers.base import ReportError, build_provider, providers_for
from mlci_dagster.providers.gcp_tpu import TpuVmProvider
from mlci_dagster.providers.gcp_tpu import provider as tpu_provider
from mlci_dagster.providers.gcp_tpu.diagnose import interruption, readiness
from mlci_dagster.providers.gcp_tpu.provider import TpuLocation, label_value, node_id
from mlci_dagster.providers.handle import SandboxError, SandboxHandle
from mlci_dagster.providers.janitor import sweep
from mlci_dagster.providers.ports import allocate_free_port
from mlci_dagster.registry import loader
from mlci_dagster.registry.gcp_tpu import SshCommandPipeline, TpuVmSandbox
from mlci_dagster.registry.models import TestConfig
from mlci_dagster.vocabulary import FailureKind
from tests.support.dagster_services import wait_until
from tests.support.runs import run_partition, stage_details
from tests.support.services import SSHD, require
from tests.support.tpu_api import LoopbackSshd, TpuApiServer

EXAMPLE_TPU = EXAMPLE_REGISTRY.parent / "gcp-tpu"
PROJECT, ZONE = "mlci-test-project", "us-central2-b"
KEY_ENV = "MLCI_TPU_SSH_KEY"
RUN_ID = "6f1c2d3e-aaaa-bbbb-cccc-0123456789ab"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    """The VM, serving SFTP as a real one does: every test that reaches a node needs it (the
    registry's and the naming rules' tests run without)."""
    require(SSHD)
    with LoopbackSshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def api(sshd: LoopbackSshd, monkeypatch: pytest.MonkeyPatch) -> Iterator[TpuApiServer]:
    monkeypatch.setenv(KEY_ENV, sshd.private_key)
    with TpuApiServer() as server:
        server.state.create_s = server.state.delete_s = 0.2
        yield server


def sandbox_spec(api: TpuApiServer, sshd: LoopbackSshd, **extra: Any) -> TpuVmSandbox:
    return TpuVmSandbox.model_validate({
        "provider": "gcp-tpu-vm", "project": PROJECT, "zone": ZONE,
        "accelerator_type": "v4-8", "runtime_version": "tpu-ubuntu2204-base", "spot": True,
        "api_endpoint": api.url, "state_poll_s": 0.2,
        "ssh": {"user": sshd.user, "private_key_env": KEY_ENV, "port": sshd.port},
        **extra})


def make_provider(home: Path, api: TpuApiServer) -> TpuVmProvider:
    return TpuVmProvider(home, [KEY_ENV], settings=TpuLocation(PROJECT, ZONE, api.url),
                         poll_interval_s=0.05)


@pytest.fixture
def sandbox(tmp_path: Path, api: TpuApiServer, sshd: LoopbackSshd
            ) -> Iterator[tuple[TpuVmProvider, SandboxHandle]]:
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={"MLCI_FRAMEWORK": "jax"}, teardown_s=60)
    provider.wait_until_ready(handle, spec, timeout_s=20)
    yield provider, handle
    assert provider.destroy(handle, timeout_s=60).clean


def ssh_pipeline(name: str, command: list[str] | str, **extra: Any) -> SshCommandPipeline:
    return SshCommandPipeline.model_validate({"kind": "ssh_command", "name": name,
                                              "command": command, **extra})


def remote_processes(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the VM is this machine)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def pipeline_running(sandbox_id: str, pipeline: str) -> Path | None:
    """The file in which the pipeline's remote shell notes its process group on the VM (this
    machine), while the pipeline runs there: its command has started and not ended."""
    pgid = Path(f"/tmp/mlci-{sandbox_id}-{pipeline}.pgid")
    return pgid if pgid.exists() else None


def preempt_once_running(api: TpuApiServer, pipeline: str, node: str | None = None
                         ) -> threading.Event:
    """Preempts the node (`node`, else the first READY one) as soon as `pipeline` runs on it,
    from a thread: mid-run whatever the machine's speed, never before it started. The event is
    set once it did."""
    def node_running_it() -> str | None:
        names = [node] if node else [name.rsplit("/", 1)[-1] for name, n in
                                     list(api.state.nodes.items()) if n.state == "READY"]
        return next((name for name in names if pipeline_running(name, pipeline)), None)

    preempted = threading.Event()

    def preempt() -> None:
        api.preempt(wait_until(node_running_it, 60, f"{pipeline} running on a node",
                               interval_s=0.02))
        preempted.set()

    threading.Thread(target=preempt, daemon=True).start()
    return preempted


def wait_gone(marker: str, timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := remote_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --- nodes -----------------------------------------------------------------------------------


def test_create_records_the_handle_before_the_node_and_labels_a_ready_spot_node(
        tmp_path, api, sshd):
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    ledger_at_create: list[list[str]] = []
    real_create = api.state.create

    def create(parent: str, node: str, body: dict[str, Any]):
        ledger_at_create.append([h.sandbox_id for h in provider.ledger.live()])
        return real_create(parent, node, body)

    api.state.create = create  # type: ignore[method-assign]
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={}, teardown_s=60)
    checks = provider.wait_until_ready(handle, spec, timeout_s=20)

    assert ledger_at_create == [[handle.sandbox_id]]
    node = api.state.get(handle.state["node"])
    assert node.state == "READY"
    assert node.body["labels"] == {"mlci-run-id": RUN_ID, "mlci-partition": "jax-smoke_jax",
                                   "mlci-expires-at": str(int(handle.expires_at))}
    assert node.body["schedulingConfig"] == {"spot": True}
    assert node.body["acceleratorType"] == "v4-8"
    assert node.body["runtimeVersion"] == "tpu-ubuntu2204-base"
    assert handle.sandbox_id.startswith("mlci-jax-smoke-jax-")
    assert handle.state["ip"] == "127.0.0.1"
    assert [c["object"] for c in checks] == ["create operation", f"node {handle.sandbox_id}",
                                             "ssh"]
    assert provider.destroy(handle, timeout_s=60).clean


def test_a_failed_create_operation_fails_the_sandbox_as_infra(tmp_path, api, sshd):
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    api.state.fail_next_create("There is no more capacity in the zone \"us-central2-b\"")
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={}, teardown_s=60)

    with pytest.raises(SandboxError) as error:
        provider.wait_until_ready(handle, spec, timeout_s=10)

    assert error.value.kind == "infra"
    assert "no more capacity" in str(error.value) and "create_node" in str(error.value)
    assert provider.destroy(handle, timeout_s=60).clean  # nothing exists: idempotent


def test_a_node_preempted_before_it_is_ready_fails_the_sandbox_as_infra(tmp_path, api, sshd):
    api.state.create_s = 1.0
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={}, teardown_s=60)
    handle.state.pop("create_operation")  # look at the node itself while it is CREATING
    threading.Timer(0.3, api.preempt, [handle.sandbox_id]).start()

    with pytest.raises(SandboxError, match="PREEMPTED") as error:
        provider.wait_until_ready(handle, spec, timeout_s=10)

    assert error.value.kind == "infra"
    assert provider.destroy(handle, timeout_s=60).clean


def test_ssh_that_refuses_the_key_fails_readiness_naming_ssh(tmp_path, api, sshd, monkeypatch):
    stranger = tmp_path / "stranger_ed25519"  # a key the VM does not authorize
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    monkeypatch.setenv(KEY_ENV, stranger.read_text())
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={}, teardown_s=60)

    with pytest.raises(SandboxError, match="SSH to the node does not work") as error:
        provider.wait_until_ready(handle, spec, timeout_s=1.5)

    assert error.value.kind in ("infra", "timeout")
    assert stranger.read_text().splitlines()[1] not in str(error.value)
    assert provider.destroy(handle, timeout_s=60).clean


# --- ssh_command pipelines -------------------------------------------------------------------


def test_ssh_command_passes_with_outputs_captured_and_engine_variables(sandbox):
    provider, handle = sandbox
    pipeline = ssh_pipeline(
        "train", 'echo "framework=$MLCI_FRAMEWORK"; echo "accuracy=0.953"; echo "$GREETING" >&2',
        env={"GREETING": "hello from ${config}"}, expect_output=["hello from jax-smoke"],
        outputs={"accuracy": "accuracy=([0-9.]+)", "framework": "framework=(\\w+)"})

    result = provider.run_pipeline(handle, pipeline, {"config": "jax-smoke"}, timeout_s=20)

    assert result.passed, result.summary
    assert result.outputs == {"accuracy": "0.953", "framework": "jax"}
    assert result.details["exit_code"] == 0
    log = Path(result.log_ref).read_text()
    assert "accuracy=0.953" in log and "--- stderr" in log


def test_ssh_command_argv_is_quoted_for_the_remote_shell(sandbox):
    provider, handle = sandbox
    pipeline = ssh_pipeline("argv", ["printf", "%s|", "two words", "$HOME", "a'b"],
                            expect_output=["two words|$HOME|a'b|"])

    result = provider.run_pipeline(handle, pipeline, {}, timeout_s=20)

    assert result.passed, result.summary


@pytest.mark.parametrize(("extra", "why"), [
    ({"command": "echo boom >&2; exit 3"}, "exited 3, expected 0"),
    ({"command": "echo done", "expect_output": ["all tests passed"]},
     "output lacks 'all tests passed'"),
    ({"command": "echo done", "outputs": {"loss": "loss=([0-9.]+)"}}, "output 'loss' not found"),
])
def test_ssh_command_fails_as_product(sandbox, extra, why):
    provider, handle = sandbox
    pipeline = ssh_pipeline("check", **extra)

    result = provider.run_pipeline(handle, pipeline, {}, timeout_s=20)

    assert not result.passed
    assert result.failure_kind is FailureKind.PRODUCT
    assert why in result.summary


def test_ssh_command_expected_exit_code_passes(sandbox):
    provider, handle = sandbox
    result = provider.run_pipeline(handle, ssh_pipeline("nonzero", "exit 4", expect_exit_code=4),
                                   {}, timeout_s=20)
    assert result.passed, result.summary


def test_ssh_command_timeout_kills_the_remote_process_group(sandbox):
    provider, handle = sandbox
    # A child in the background and one in the foreground: both must die with the group.
    pipeline = ssh_pipeline("hang", "sleep 7301 & sleep 7302; echo never")

    result = provider.run_pipeline(handle, pipeline, {}, timeout_s=1.0)

    assert not result.passed
    assert result.failure_kind is FailureKind.TIMEOUT
    assert "killed at its timeout of 1s" in result.summary
    assert result.details["remote_kill"] == "remote process group killed"
    assert wait_gone("sleep 730") == []
    assert result.duration_s < 8


def test_a_node_preempted_mid_run_fails_the_pipeline_as_infra(sandbox, api):
    provider, handle = sandbox
    pipeline = ssh_pipeline("long-train", "echo step 1; sleep 7401; echo never")
    preempted = preempt_once_running(api, "long-train", handle.sandbox_id)

    result = provider.run_pipeline(handle, pipeline, {}, timeout_s=30)

    assert preempted.wait(10)  # while long-train ran on the node

    assert not result.passed
    assert result.failure_kind is FailureKind.INFRA
    assert "PREEMPTED" in result.summary and "infrastructure" in result.summary
    assert result.duration_s < 10
    assert wait_gone("sleep 7401") == []
    # A later pipeline on the lost node fails at once, as infra too.
    again = provider.run_pipeline(handle, ssh_pipeline("after", "true"), {}, timeout_s=30)
    assert again.failure_kind is FailureKind.INFRA and "PREEMPTED" in again.summary


def test_the_ssh_key_never_reaches_logs_or_the_handle(sandbox, sshd):
    provider, handle = sandbox
    key_line = sshd.private_key.splitlines()[1]
    pipeline = ssh_pipeline("leak", 'echo "$SECRET_IN"', env={"SECRET_IN": "${env.KEY}"})

    result = provider.run_pipeline(handle, pipeline, {"env": {"KEY": sshd.private_key}},
                                   timeout_s=20)

    assert result.passed, result.summary
    assert key_line not in Path(result.log_ref).read_text()
    assert key_line not in str(handle.to_dict())


# --- test reports, fetched from the VM over SFTP ---------------------------------------------


def home_of(user: str) -> Path:
    """The login's home directory on the VM (this machine): where its commands run."""
    return Path(pwd.getpwnam(user).pw_dir)


def vm_files(root: Path, contents: dict[str, str]) -> Path:
    """Files written on the VM (this machine) under `root`, by relative path."""
    for relative, text in contents.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


REPORT_TREE = {"a/r1.xml": "<a/>", "b/r2.xml": "<b/>", "b/.hidden.xml": "<h/>",
               "b/notes.txt": "n", "c/nested/r3.xml": "<c/>", "d.xml/r4.xml": "<d/>"}


@pytest.mark.parametrize(("pattern", "expected"), [
    ("*/*.xml", ["a/r1.xml", "b/r2.xml", "d.xml/r4.xml"]),  # sorted; no dot file, no directory
    ("b/.*.xml", ["b/.hidden.xml"]),  # a leading dot only when asked for
    ("?/r[2-3].xml", ["b/r2.xml"]),
    ("*/nested/*.xml", ["c/nested/r3.xml"]),
    ("a/r1.xml", ["a/r1.xml"]),  # no wildcard: the file itself
    ("a/missing.xml", []),
    ("missing/*.xml", []),
    ("*.xml", []),  # d.xml is a directory, not a report
])
def test_report_files_glob_on_the_vm_and_copy_what_matches(sandbox, tmp_path, pattern, expected):
    provider, handle = sandbox
    vm = vm_files(tmp_path / "vm", REPORT_TREE)
    pipeline = ssh_pipeline("unit-tests", "true")

    found = provider.report_files(handle, pipeline, f"{vm}/{pattern}", tmp_path / "fetched")

    assert found == [tmp_path / "fetched" / str(vm).lstrip("/") / name for name in expected]
    assert [path.read_text() for path in found] == [REPORT_TREE[name] for name in expected]


def test_a_relative_report_pattern_is_under_the_logins_home_where_the_command_ran(
        sandbox, sshd, tmp_path):
    provider, handle = sandbox
    vm = tmp_path / "vm"
    relative = os.path.relpath(vm, home_of(sshd.user))  # through `..`: nothing lands in ~
    pipeline = ssh_pipeline("writes", f"mkdir -p {relative}/out && echo '<r/>' > "
                                      f"{relative}/out/report.xml")
    assert provider.run_pipeline(handle, pipeline, {}, timeout_s=20).passed

    found = provider.report_files(handle, pipeline, f"{relative}/out/*.xml",
                                  tmp_path / "fetched")

    assert [path.read_text() for path in found] == ["<r/>\n"]
    assert found[0].as_posix().endswith(f"{vm}/out/report.xml")


def test_report_files_are_cut_at_max_report_files_by_path(sandbox, tmp_path, monkeypatch):
    provider, handle = sandbox
    monkeypatch.setattr(tpu_provider, "MAX_REPORT_FILES", 2)
    vm = vm_files(tmp_path / "vm", {f"r{i}.xml": f"<r{i}/>" for i in (3, 1, 2)})

    found = provider.report_files(handle, ssh_pipeline("p", "true"), f"{vm}/*.xml",
                                  tmp_path / "fetched")

    assert [path.name for path in found] == ["r1.xml", "r2.xml"]


def test_an_unreachable_vm_is_a_report_error_naming_the_node_and_the_login(sandbox, tmp_path,
                                                                           sshd):
    provider, handle = sandbox
    handle.state["ssh"]["port"] = closed = allocate_free_port()  # nothing listens there

    with pytest.raises(ReportError) as error:
        provider.report_files(handle, ssh_pipeline("p", "true"), "out/*.xml",
                              tmp_path / "fetched")

    message = str(error.value)
    assert message.startswith(f"node {handle.sandbox_id}: ssh {sshd.user}@127.0.0.1:{closed}: ")
    assert sshd.private_key.splitlines()[1] not in message and "Traceback" not in message


def test_the_reports_of_a_preempted_node_are_an_error_at_once(sandbox, api, tmp_path):
    provider, handle = sandbox
    api.preempt(handle.sandbox_id)

    with pytest.raises(ReportError, match="PREEMPTED.*the reports on it went with it"):
        provider.report_files(handle, ssh_pipeline("p", "true"), "out/*.xml",
                              tmp_path / "fetched")


# --- teardown, list_live, janitor ------------------------------------------------------------


def test_destroy_deletes_waits_and_verifies_not_found(tmp_path, api, sshd):
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={}, teardown_s=60)
    provider.wait_until_ready(handle, spec, timeout_s=20)
    artifacts = provider.collect_artifacts(handle)

    report = provider.destroy(handle, timeout_s=60)

    assert any(a.endswith("tpu-node.json") for a in artifacts)
    assert report.clean and report.remote["node_gone"], report
    assert api.state.nodes == {}
    assert ("DELETE", f"/v2/{handle.state['node']}") in api.requests
    assert api.requests[-1] == ("GET", f"/v2/{handle.state['node']}")  # the 404 that proves it
    assert provider.ledger.live() == []
    assert provider.destroy(handle, timeout_s=60).clean  # idempotent


def test_list_live_and_the_janitor_find_nodes_by_label_when_the_ledger_is_lost(
        tmp_path, api, sshd):
    provider = make_provider(tmp_path / "home", api)
    spec = sandbox_spec(api, sshd)
    handle = provider.create(spec, config="jax-smoke", engine="jax", run_id=RUN_ID,
                             engine_variables={}, teardown_s=60)
    provider.wait_until_ready(handle, spec, timeout_s=20)
    api.state.create(f"projects/{PROJECT}/locations/{ZONE}", "someone-elses",
                     {"acceleratorType": "v4-8", "runtimeVersion": "x"})
    shutil.rmtree(tmp_path / "home")

    fresh = providers_for([spec], tmp_path / "other-home", [KEY_ENV])[-1]
    live = fresh.list_live()

    assert [(h.sandbox_id, h.run_id, h.config, h.engine) for h in live] == [
        (handle.sandbox_id, RUN_ID, "jax-smoke", "jax")]
    verdicts = sweep([fresh], run_over=lambda run_id: run_id == RUN_ID,
                     teardown_timeout=lambda _: 60)
    assert [(v.sandbox_id, v.reason) for v in verdicts] == [
        (handle.sandbox_id, f"run {RUN_ID[:8]} is over")]
    assert verdicts[0].report.remote["node_gone"]
    assert [n.rsplit("/", 1)[-1] for n in api.state.nodes] == ["someone-elses"]


def test_a_node_whose_metadata_is_lost_is_rebuilt_from_its_labels(tmp_path, api):
    provider = make_provider(tmp_path / "home", api)
    api.state.create(f"projects/{PROJECT}/locations/{ZONE}", "mlci-orphan-jax-1234abcd",
                     {"acceleratorType": "v4-8", "runtimeVersion": "x", "labels": {
                         "mlci-run-id": "r1", "mlci-partition": "orphan_jax",
                         "mlci-expires-at": "12"}})

    [handle] = provider.list_live()

    assert (handle.run_id, handle.config, handle.engine, handle.expires_at) == (
        "r1", "orphan", "jax", 12.0)
    verdicts = sweep([provider], run_over=lambda _: False, teardown_timeout=lambda _: 60)
    assert verdicts[0].reason.startswith("expired")
    assert api.state.nodes == {}


# --- names, labels, diagnosis ----------------------------------------------------------------


def test_node_ids_and_label_values_are_what_gcp_accepts():
    long_config = "c" * 63
    assert len(node_id(long_config, "jax", "1234abcd")) <= 63
    assert node_id("Jax_Smoke", "jax", "1234abcd") == "mlci-jax-smoke-jax-1234abcd"
    assert label_value("Run.ID/7") == "run-id-7"
    long = label_value("x" * 100)
    assert len(long) == 63 and long != label_value("x" * 99)


@pytest.mark.parametrize(("state", "ready", "terminal"), [
    ("READY", True, False), ("CREATING", False, False), ("REPAIRING", False, False),
    ("PREEMPTED", False, True), ("TERMINATED", False, True), ("STOPPED", False, True),
    ("SOMETHING_NEW", False, True),
])
def test_readiness_of_a_node_state(state, ready, terminal):
    verdict = readiness("n", state)
    assert (verdict.ready, verdict.terminal) == (ready, terminal)


@pytest.mark.parametrize(("state", "cut_short"), [
    ("READY", False), ("REPAIRING", False), ("PREEMPTED", True), ("TERMINATED", True),
    (None, True),
])
def test_interruption_of_a_running_pipeline(state, cut_short):
    assert bool(interruption("n", state)) is cut_short


# --- the registry ----------------------------------------------------------------------------

def config_with(sandbox: dict[str, Any], pipelines: list[dict[str, Any]] | None = None
                ) -> dict[str, Any]:
    return {"name": "tpu", "owners": {"default": "me"}, "image": {"ref": "x"},
            "sandbox": sandbox, "pipelines": pipelines or [
                {"kind": "ssh_command", "name": "p", "command": "true"}]}


TPU = {"provider": "gcp-tpu-vm", "project": "my-project-1", "zone": "us-central2-b",
       "accelerator_type": "v5litepod-8", "runtime_version": "v2-alpha-tpuv5-lite",
       "ssh": {"user": "mlci", "private_key_env": KEY_ENV}}


@pytest.mark.parametrize(("change", "message"), [
    ({"accelerator_type": "tpu-big"}, "sandbox.gcp-tpu-vm.accelerator_type"),
    ({"zone": "central"}, "expected a zone such as us-central2-b"),
    ({"ssh": {"user": "mlci"}}, "sandbox.gcp-tpu-vm.ssh.private_key_env"),
    ({"ssh": {**TPU["ssh"], "port": 70000}}, "expected a port between 1 and 65535"),
    ({"ssh": {**TPU["ssh"], "port": "ssh"}}, "expected a port number, or a ${...} reference"),
    ({"api_endpoint": "localhost:8080"}, "expected an http:// or https:// host[:port] URL"),
    ({"machine": "big"}, "sandbox.gcp-tpu-vm.machine"),
])
def test_registry_rejects_a_bad_tpu_sandbox(change, message):
    with pytest.raises(ValidationError) as error:
        TestConfig.model_validate(config_with({**TPU, **change}))
    assert message in str(error.value)


def test_registry_accepts_references_and_names_the_provider_among_its_choices():
    config = TestConfig.model_validate(config_with(
        {**TPU, "project": "${env.P}", "ssh": {**TPU["ssh"], "port": "${env.PORT}"}}))
    assert config.sandbox.provider == "gcp-tpu-vm"
    with pytest.raises(ValidationError, match="gcp-tpu-vm"):
        TestConfig.model_validate(config_with({**TPU, "provider": "gcp-tpu"}))


def test_ssh_command_runs_only_in_a_tpu_sandbox():
    with pytest.raises(ValidationError, match="'ssh_command' runs only in a 'gcp-tpu-vm'"):
        TestConfig.model_validate(config_with({"provider": "local"}))


def test_the_provider_is_found_by_name_and_finds_the_nodes_of_its_project_and_zone(
        tmp_path, api, sshd):
    location = TpuLocation(PROJECT, ZONE, api.url)
    provider = build_provider("gcp-tpu-vm", tmp_path / "by-name", [KEY_ENV], settings=location)
    creator = make_provider(tmp_path / "home", api)
    handle = creator.create(sandbox_spec(api, sshd), config="jax-smoke", engine="jax",
                            run_id=RUN_ID, engine_variables={}, teardown_s=60)
    elsewhere = TpuLocation(PROJECT, "europe-west4-a", api.url)
    try:
        assert (provider.name, provider.settings) == ("gcp-tpu-vm", location)
        assert [(h.sandbox_id, h.provider, h.run_id, h.config, h.engine)
                for h in provider.list_live()] == [
            (handle.sandbox_id, "gcp-tpu-vm", RUN_ID, "jax-smoke", "jax")]
        assert build_provider("gcp-tpu-vm", tmp_path / "other-zone",
                              settings=elsewhere).list_live() == []
    finally:
        assert creator.destroy(handle, timeout_s=60).clean
    with pytest.raises(KeyError, match="unknown provider 'gcp-tpu' .*gcp-tpu-vm"):
        build_provider("gcp-tpu", tmp_path)


# --- the example through Dagster -------------------------------------------------------------


@pytest.fixture
def tpu_example(tmp_path, api, sshd, monkeypatch) -> Iterator[Path]:
    """The gcp-tpu example's registry, pointed at the loopback TPU API and sshd. What its
    configs leave in the VM's /tmp (this machine's) goes afterwards, as a deleted VM's would."""
    started = time.time()
    registry = tmp_path / "gcp-tpu"
    shutil.copytree(EXAMPLE_TPU, registry)
    for path in (registry / "configs").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        config["sandbox"]["state_poll_s"] = 0.5
        path.write_text(yaml.safe_dump(config))
    environment = {"MLCI_TPU_PROJECT": PROJECT, "MLCI_TPU_API_ENDPOINT": api.url,
                   "MLCI_TPU_SSH_PORT": str(sshd.port), "MLCI_TPU_SSH_USER": sshd.user}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    yield registry
    for left in Path("/tmp").glob("mlci-tpu-*-reports"):  # the example's reports, per node
        if left.stat().st_mtime >= started:
            shutil.rmtree(left, ignore_errors=True)


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    loader._cache.clear()  # the resource's cached registry would keep the old file for 2 s


def node_creates(api) -> int:
    return sum(1 for method, path in api.requests if method == "POST" and path.endswith("/nodes"))


def test_the_example_passes_end_to_end_on_the_loopback_services(tpu_example, api, instance):
    result, record = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")

    assert record["status"] == "pass", record["error_summary"]
    assert result.success
    pipelines = stage_details(instance, result.run_id, "pipeline_runs")
    assert pipelines["outputs"]["cpu-tests"] == {"framework": "jax"}
    assert pipelines["outputs"]["python-version"]["python"].startswith("3.")
    # Its unittest run's JUnit report, fetched from the VM over SFTP: each test recorded.
    assert record["tests"] == {"passed": 3, "failed": 0, "errors": 0, "skipped": 0}
    assert record["test_report_problems"] == []
    kept = read_report(Path(record["test_reports"]["cpu-tests"]))
    assert "cpu-tests :: Numerics :: test_softmax_sums_to_one" in {c.id for c in kept.cases}
    handle = stage_details(instance, result.run_id, "sandbox")["handle"]
    assert handle["state"]["node"] not in api.state.nodes
    assert ("DELETE", f"/v2/{handle['state']['node']}") in api.requests
    # The node existed from the sandbox stage to the end of teardown, at the spot rate.
    assert 0 < record["billed_s"] <= record["duration_s"]
    assert record["cost_usd"] == pytest.approx(1.20 * 0.4 * record["billed_s"] / 3600, abs=1e-6)


def test_a_run_that_would_exceed_the_monthly_budget_is_refused_before_a_node_exists(
        tpu_example, api, instance, capsys):
    _, first = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")
    assert first["status"] == "pass" and first["cost_usd"] > 0
    # Room for the run recorded, not for a second one like it.
    edit_yaml(tpu_example / "mlci.yaml",
              lambda s: s["budget"].update(monthly_usd=first["cost_usd"] * 1.5))
    creates = node_creates(api)

    result, second = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")

    assert second["status"] == "skip"
    assert "budget" in second["error_summary"] and "median of 1 recorded run" in \
        second["error_summary"], second["error_summary"]
    assert second["cost_usd"] == 0 and second["billed_s"] == 0
    assert node_creates(api) == creates  # nothing was created
    assert result.success  # a refusal is not a failure: the check is a warning
    [check] = [e for e in result.get_asset_check_evaluations()
               if e.check_name == "lifecycle_passed"]
    assert not check.passed and check.severity is dg.AssetCheckSeverity.WARN
    # `mlci cost` shows the month: the recorded run, the budget, the projection.
    assert cli.main(["--registry", str(tpu_example), "cost"]) == 0  # DAGSTER_HOME: instance's
    out = capsys.readouterr().out
    assert "tpu-cpu-tests|jax" in out and f"${first['cost_usd']:.4f}" in out
    assert "budget: $" in out and "tpu-jax-nightly|jax" in out


def test_a_node_preempted_mid_run_is_retried_by_dagster_and_recorded_as_infra(
        tpu_example, api, instance):
    def slow_and_retried(config: dict[str, Any]) -> None:
        config["sandbox"]["retries_on_preemption"] = 1
        config["pipelines"].insert(0, {"kind": "ssh_command", "name": "train",
                                       "command": "echo training; sleep 3", "timeout_s": 60})

    edit_yaml(tpu_example / "configs" / "tpu-cpu-tests.yaml", slow_and_retried)

    preempted = preempt_once_running(api, "train")  # the first node, while train runs on it
    result, last = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")
    assert preempted.wait(10)

    records = [dict(r.asset_materialization.metadata["record"].value) for r in
               instance.fetch_materializations(
                   dg.AssetRecordsFilter(asset_key=dg.AssetKey("results")), limit=10).records]
    assert [r["status"] for r in reversed(records)] == ["fail-pipeline_runs", "pass"]
    preempted, retried = records[1], records[0]
    assert preempted["failure_kind"] == "infra" and preempted["preempted"]
    assert "PREEMPTED" in preempted["error_summary"]
    assert retried["run_id"] == preempted["run_id"] == result.run_id  # one run, two attempts
    assert result.success and last["status"] == "pass"
    assert node_creates(api) == 2 and not api.state.nodes


# --- an ssh_command's test reports through Dagster -------------------------------------------


def report_writer(name: str, path: str | Path, *, padding: int = 0,
                  reports: list[str] | None = None) -> dict[str, Any]:
    """An ssh_command pipeline that writes, on the VM (this machine), a JUnit report at `path`
    (relative: to its working directory there) with one passing and one failing test case, and
    declares it (or `reports`)."""
    xml = ('<testsuite name="vm"><testcase classname="vm.test_numerics" name="test_adds"/>'
           '<testcase classname="vm.test_numerics" name="test_divides"><failure message='
           '"ZeroDivisionError: division by zero">Traceback ...</failure></testcase>'
           f'<!-- {"x" * padding} --></testsuite>')
    write = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
             "p.parent.mkdir(parents=True, exist_ok=True); p.write_text(sys.argv[2])")
    return {"kind": "ssh_command", "name": name, "command": ["python3", "-c", write, str(path),
                                                             xml],
            "reports": [{"format": "junit", "path": glob} for glob in
                        (reports if reports is not None else [str(path)])],
            "timeout_s": 60}


def running_only(registry: Path, *pipelines: dict[str, Any]) -> None:
    """The example's tpu-cpu-tests config, with `pipelines` instead of its own."""
    edit_yaml(registry / "configs" / "tpu-cpu-tests.yaml",
              lambda config: config.update(pipelines=list(pipelines)))


def test_an_ssh_commands_junit_report_is_fetched_from_the_vm_and_gives_the_record_its_tests(
        tpu_example, instance, sshd, tmp_path):
    relative = os.path.relpath(tmp_path / "vm", home_of(sshd.user))  # from where it runs
    running_only(tpu_example, report_writer("unit-tests", f"{relative}/reports/unit.xml",
                                            reports=[f"{relative}/reports/*.xml"]))

    _, record = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")

    assert record["status"] == "pass"  # a report is evidence, not the pipeline's verdict
    assert record["tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}
    [failing] = record["failing_tests"]
    assert failing["id"] == "vm :: vm.test_numerics :: test_divides"
    assert failing["pipeline"] == "unit-tests" and failing["status"] == "fail"
    assert failing["message"].startswith("ZeroDivisionError: division by zero")
    assert record["test_report_problems"] == []
    kept = read_report(Path(record["test_reports"]["unit-tests"]))
    assert [(c.name, str(c.status)) for c in kept.cases] == [("test_adds", "pass"),
                                                            ("test_divides", "fail")]


def test_a_report_the_ssh_command_never_wrote_is_a_problem_and_the_rest_is_kept(
        tpu_example, instance, tmp_path):
    vm = tmp_path / "vm"
    quiet = {"kind": "ssh_command", "name": "quiet", "command": "echo loss=0.25",
             "outputs": {"loss": "loss=([0-9.]+)"}, "reports": [{"path": f"{vm}/quiet/*.xml"}]}
    running_only(tpu_example, report_writer("unit-tests", vm / "unit.xml"), quiet)

    result, record = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")

    assert record["status"] == "pass"
    assert record["test_report_problems"] == [
        f"pipeline 'quiet': reports[0]: no report at {vm}/quiet/*.xml (the pipeline ended "
        "before writing it, or wrote it elsewhere)"]
    assert record["tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}
    assert stage_details(instance, result.run_id, "pipeline_runs")["outputs"]["quiet"] == {
        "loss": "0.25"}


def test_a_report_over_the_size_limit_is_a_problem_naming_the_file_and_its_size(
        tpu_example, instance, sshd, tmp_path, monkeypatch):
    monkeypatch.setattr(tpu_provider, "MAX_REPORT_BYTES", 400)
    report = tmp_path / "vm" / "big.xml"
    running_only(tpu_example, report_writer("big", report, padding=500))

    _, record = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")

    assert record["status"] == "pass"
    [problem] = record["test_report_problems"]
    assert problem.startswith("pipeline 'big': reports[0]: node mlci-tpu-cpu-tests-jax-")
    assert problem.endswith(f"{sshd.user}@127.0.0.1:{report}: {report.stat().st_size} bytes, "
                            "over the limit of 400 bytes for one file")
    assert record["tests"] == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def test_a_report_removed_before_it_is_fetched_is_a_problem_and_no_sftp_session_is_left(
        tpu_example, instance, sshd, tmp_path, monkeypatch):
    vm = tmp_path / "vm"
    running_only(tpu_example, report_writer("writes-b", vm / "b.xml", reports=[]),
                 report_writer("two", vm / "a.xml", reports=[f"{vm}/*.xml"]))
    real_open = paramiko.SFTPClient.open

    def removed_first(sftp, filename, *args, **kwargs):
        if filename.endswith("/b.xml"):
            Path(filename).unlink()  # on the VM (this machine), after it was listed
        return real_open(sftp, filename, *args, **kwargs)

    monkeypatch.setattr(paramiko.SFTPClient, "open", removed_first)

    _, record = run_partition(instance, tpu_example, "tpu-cpu-tests|jax")

    assert record["status"] == "pass"
    [problem] = record["test_report_problems"]
    assert problem.startswith("pipeline 'two': reports[0]: node mlci-tpu-cpu-tests-jax-")
    assert problem.endswith(f"{sshd.user}@127.0.0.1:{vm}/b.xml: could not be read: "
                            "No such file"), problem
    assert record["tests"]["passed"] == 0  # a report that fails halfway counts nothing
    sshd_process = psutil.Process(sshd.process.pid)
    wait_until(lambda: not sshd_process.children(), 5, "the SFTP sessions to end",
               interval_s=0.05)
