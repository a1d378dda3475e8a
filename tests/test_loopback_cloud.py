"""scripts/loopback-aws.sh and scripts/loopback-gcp.sh (tests/support/loopback_cloud.py): each
runs its cloud example against loopback services to a pass, and leaves no process, port or
temporary directory behind, after a pass and after a Ctrl-C in the middle of the run; the
examples' READMEs name them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from mlci_dagster.providers.ports import port_is_free
from mlci_dagster.registry import load_registry
from tests.support.dagster_services import wait_until
from tests.support.loopback_cloud import EXAMPLES, TPU_PROJECT
from tests.support.services import SSHD, needs
from tests.support.tpu_api import listed_nodes

ROOT = Path(__file__).resolve().parent.parent
TPU_ZONE = load_registry(EXAMPLES / "gcp-tpu").configs["tpu-cpu-tests"].config.sandbox.zone
needs_sshd = needs(SSHD)


def start(script: str) -> subprocess.Popen[str]:
    """The script in a process group of its own, as a terminal's foreground job."""
    return subprocess.Popen([str(ROOT / "scripts" / script)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def assert_nothing_left(output: str) -> None:
    """Every port the script announced is free, no process names its temporary directory, and
    the directory is gone."""
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output.splitlines()[0])]
    [tmp] = re.findall(r"DAGSTER_HOME=(\S+)/dagster_home", output.splitlines()[0])
    assert ports and all(port_is_free(port) for port in ports), ports
    assert not [p.pid for p in psutil.process_iter(["cmdline"])
                if tmp in " ".join(p.info["cmdline"] or [])]
    assert not Path(tmp).exists()


@pytest.mark.parametrize("script", [
    "loopback-aws.sh", pytest.param("loopback-gcp.sh", marks=needs_sshd)])
def test_the_loopback_script_runs_its_example_to_a_pass_and_stops_everything(script):
    proc = start(script)
    output, _ = proc.communicate(timeout=240)

    assert proc.returncode == 0, output
    assert re.search(r": passed in [0-9.]+s", output), output
    assert output.rstrip().splitlines()[-1].startswith(
        f"loopback {script[9:12]}: PASS: every run passed: True; left in the cloud: nothing")
    assert "$ mlci --registry" in output and " report" in output
    assert_nothing_left(output)


@needs_sshd
def test_ctrl_c_in_the_middle_of_the_run_tears_down_and_stops_everything():
    proc = start("loopback-gcp.sh")
    lines: list[str] = []
    nodes: list[str] = []  # the run's nodes in the cloud when Ctrl-C is pressed
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("running 1 partition,"):
            # Mid-run: once the run's TPU node exists in the cloud, for the teardown to delete.
            [api] = re.findall(r"Cloud TPU API at (http://\S+?);", lines[0])
            nodes = wait_until(lambda api=api: listed_nodes(api, TPU_PROJECT, TPU_ZONE), 120,
                               "the run's TPU node", interval_s=0.1)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends the foreground job
            break
    output = "".join(lines) + proc.communicate(timeout=240)[0]

    assert proc.returncode == 1, output
    assert len(nodes) == 1, output
    assert "loopback gcp: interrupted (SIGINT); cleaning up" in output
    assert "left in the cloud: nothing; services stopped" in output.splitlines()[-1], output
    assert_nothing_left(output)


@pytest.mark.parametrize(("example", "script"), [("aws-sagemaker", "loopback-aws.sh"),
                                                 ("gcp-tpu", "loopback-gcp.sh")])
def test_the_example_readme_says_how_to_run_on_loopback_and_on_the_real_cloud(example, script):
    readme = (ROOT / "examples" / example / "README.md").read_text()
    assert f"scripts/{script}" in readme
    assert "## Against a real " in readme
