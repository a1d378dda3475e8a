"""One command per cloud example against loopback services: `python -m
tests.support.loopback_cloud aws|gcp` (scripts/loopback-aws.sh, scripts/loopback-gcp.sh).

It starts the example's cloud on free loopback ports (moto's server for examples/aws-sagemaker,
with the CodeBuild project and ECR image its build needs and its invocations' answers queued;
the Cloud TPU v2 emulation and a real sshd for
examples/gcp-tpu), sets the endpoint variables the example's configs read and a DAGSTER_HOME of
its own in a temporary directory, runs `mlci sync`, `mlci run` and `mlci report` on the example,
says what the cloud's API still lists, then stops everything it started, on Ctrl-C (or SIGTERM,
SIGHUP) too: `mlci` runs in a session of its own, is sent one SIGINT and waited for while it
tears down, then `mlci janitor` reaps what is left before the services stop. Exits 0 only if
every run passed and nothing is left.

On gcp only `tpu-cpu-tests` runs: the "VM" is this machine, and `tpu-jax-nightly` needs a TPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlci_dagster.paths import EXAMPLE_REGISTRY
from mlci_dagster.registry import load_registry
from tests.support.aws_proxy import (
    FAKE_CREDENTIALS,
    REAL_CREDENTIALS,
    REGION,
    create_project_and_image,
    moto_server,
)
from tests.support.loopback import environment_set
from tests.support.sagemaker_api import (
    ROLE,
    queue_invocation_results,
    tagged_resources,
)
from tests.support.tpu_api import LoopbackSshd, TpuApiServer, listed_nodes

EXAMPLES = EXAMPLE_REGISTRY.parent
TEARDOWN_WAIT_S = 180  # what `mlci run` may take to tear down after its SIGINT
TPU_PROJECT = "mlci-loopback"


@dataclass
class Cloud:
    """A cloud started on loopback: what the example's runs need in their environment, what to
    tell the user, and how to ask its API what is left."""

    environment: dict[str, str]
    services: list[str]
    left: Callable[[], list[str]]


@dataclass(frozen=True)
class Example:
    registry: Path
    filters: tuple[str, ...]  # which partitions to run
    cloud: Callable[[Path], contextlib.AbstractContextManager[Cloud]]


@contextlib.contextmanager
def aws_cloud(tmp: Path) -> Iterator[Cloud]:
    """moto's server, fake credentials in the environment (a real account's unset), the
    CodeBuild project and ECR image of every config's codebuild build, and the two answers the
    example's invocations expect."""
    with environment_set(FAKE_CREDENTIALS, REAL_CREDENTIALS), \
            moto_server(tmp / "moto.log") as url:
        for loaded in load_registry(EXAMPLES / "aws-sagemaker").configs.values():
            if (build := loaded.config.image.build) is not None and build.codebuild:
                create_project_and_image(url, build.codebuild.project, build.codebuild.image,
                                         REGION)
        queue_invocation_results(url, {"predictions": [{"label": "setosa", "score": 0.97}]},
                                 {"count": 3})
        yield Cloud({"MLCI_AWS_ENDPOINT_URL": url, "MLCI_SAGEMAKER_ROLE_ARN": ROLE},
                    [f"moto (SageMaker, CodeBuild, ECR) at {url}"],
                    lambda: tagged_resources(url, REGION))


@contextlib.contextmanager
def gcp_cloud(tmp: Path) -> Iterator[Cloud]:
    """The Cloud TPU v2 emulation and an sshd standing in for the node's VM."""
    zones = {config.config.sandbox.zone
             for config in load_registry(EXAMPLES / "gcp-tpu").configs.values()}
    with TpuApiServer() as api, LoopbackSshd(tmp / "sshd") as sshd:
        yield Cloud({"MLCI_TPU_PROJECT": TPU_PROJECT, "MLCI_TPU_API_ENDPOINT": api.url,
                     "MLCI_TPU_SSH_PORT": str(sshd.port), "MLCI_TPU_SSH_USER": sshd.user,
                     "MLCI_TPU_SSH_KEY": sshd.private_key},
                    [f"Cloud TPU API at {api.url}", f"sshd (the VM) at 127.0.0.1:{sshd.port}"],
                    lambda: [node for zone in sorted(zones)
                             for node in listed_nodes(api.url, TPU_PROJECT, zone)])


CLOUDS = {
    "aws": Example(EXAMPLES / "aws-sagemaker", (), aws_cloud),
    "gcp": Example(EXAMPLES / "gcp-tpu", ("--config", "tpu-cpu-tests"), gcp_cloud),
}


class Stop(Exception):
    """SIGINT, SIGTERM or SIGHUP: stop and clean up."""


def _stop(signum: int, frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def run_mlci(env: dict[str, str], registry: Path, *args: str) -> int:
    """`mlci --registry <registry> <args>`, its output on ours, in a session of its own so only
    this process decides when it is interrupted: on an interruption it gets one SIGINT and up
    to TEARDOWN_WAIT_S to tear down (then SIGKILL), and the interruption goes on up."""
    shown = registry.relative_to(Path.cwd()) if registry.is_relative_to(Path.cwd()) else registry
    print(f"$ mlci --registry {shown} {' '.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "mlci_dagster.cli", "--registry",
                             str(registry), *args], env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits too
        try:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=TEARDOWN_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        raise


def run_example(name: str, keep: bool = False) -> int:
    """Runs the example `name` ("aws" or "gcp") against its loopback cloud; the exit code."""
    example = CLOUDS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"mlci-loopback-{name}-"))
    passed, left = False, ["(not checked)"]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: None if keep else shutil.rmtree(tmp, ignore_errors=True))
        # SIGINT too: a shell without job control starts background jobs with it ignored, and
        # this process must stop (and leave mlci interruptible: handlers, unlike SIG_IGN, do
        # not survive exec).
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            stack.callback(signal.signal, signum, signal.signal(signum, _stop))
        cloud = stack.enter_context(example.cloud(tmp))
        env = {**os.environ, **cloud.environment, "DAGSTER_HOME": str(tmp / "dagster_home")}
        print(f"loopback {name}: {'; '.join(cloud.services)}; DAGSTER_HOME={tmp / 'dagster_home'}",
              flush=True)
        try:
            if run_mlci(env, example.registry, "sync") == 0:
                passed = run_mlci(env, example.registry, "run", *example.filters) == 0
                run_mlci(env, example.registry, "report", *example.filters)
        except (KeyboardInterrupt, Stop) as exc:
            why = exc if isinstance(exc, Stop) else "SIGINT"
            print(f"loopback {name}: interrupted ({why}); cleaning up", flush=True)
        finally:
            left = cloud.left()
            if left:  # a run torn down halfway, or interrupted: the janitor reaps it
                run_mlci(env, example.registry, "janitor")
                left = cloud.left()
    outcome = "PASS" if passed and not left else "FAIL"
    print(f"loopback {name}: {outcome}: every run passed: {passed}; left in the cloud: "
          f"{left or 'nothing'}; services stopped; "
          + (f"kept {tmp}" if keep else f"removed {tmp} (--keep keeps it)"),
          flush=True)
    return 0 if outcome == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.loopback_cloud",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("cloud", choices=sorted(CLOUDS))
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary DAGSTER_HOME (its history and grid) afterwards")
    args = parser.parse_args(argv)
    try:
        return run_example(args.cloud, args.keep)
    except KeyboardInterrupt:  # a Ctrl-C while the services start or stop
        return 130


if __name__ == "__main__":
    sys.exit(main())
