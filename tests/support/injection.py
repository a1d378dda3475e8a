"""Failure injection: SIGKILL of the process executing a lifecycle in the middle of a stage, then
the cleanup layers outside the run (the janitor, which ends runs whose worker is gone and reaps
their sandboxes; the run-failure sensor). Used by tests/test_cleanup.py,
tests/test_kubernetes_cleanup.py, tests/test_cloud_cleanup.py and benchmarks/failure_injection.py.

A registry per provider holds the config `inject`, paced so that each stage lasts a few seconds:
the local provider (`write_registry`); Kubernetes (`write_kubernetes_registry`) against the
loopback API emulator `emulated_cluster` starts (tests/support/kube_wire.py); SageMaker
(`write_sagemaker_registry`) against moto behind the proxy that gives endpoints their Creating
and Deleting time, which `emulated_sagemaker` starts (tests/support/sagemaker_api.py); Cloud TPU
(`write_tpu_registry`) against the loopback TPU API and a real sshd, which `emulated_tpu` starts
(tests/support/tpu_api.py). What a run left in a cloud is counted through that cloud's API."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from mlci_dagster.definitions import build_definitions
from mlci_dagster.event_log import RESULTS_ASSET
from mlci_dagster.providers.ports import port_is_free
from mlci_dagster.providers.processes import marked_processes
from mlci_dagster.registry import load_registry
from mlci_dagster.sensors.cleanup import sandbox_janitor, teardown_after_failure
from mlci_dagster.vocabulary import STAGES
from tests.support.aws_proxy import FAKE_CREDENTIALS, REAL_CREDENTIALS, REGION, moto_server
from tests.support.kube_controller import KubeController
from tests.support.kube_store import TYPES, ApiError
from tests.support.kube_wire import KubeApiServer
from tests.support.loopback import environment_set
from tests.support.sagemaker_api import (
    ROLE,
    PacedSageMaker,
    tagged_resources,
)
from tests.support.tpu_api import LoopbackSshd, TpuApiServer, TpuState, listed_nodes

PY = sys.executable
MARKER = "mlci-injected-run"
VM_MARKER = "mlci-injected-on-the-vm"  # a pipeline's process on the TPU "VM" (this machine)


def markers(root: Path) -> tuple[str, str]:
    """The argv marks of the builds and pipelines of the registry at `root` (on this machine,
    and on the TPU "VM"): its own, so that injections running side by side (another test
    process) never count, or kill, each other's."""
    tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return f"{MARKER}-{tag}", f"{VM_MARKER}-{tag}"
KEY = "inject|e1"
SLOW_S = 8  # what a ui_smoke request to /slow waits for its answer
MLCI_NAMESPACES = "app.kubernetes.io/managed-by=mlci"
SETTLE_S = 20  # how long the API may take to finish deleting a namespace after the cleanup

SLOW_SERVER = f'''
import http.server, signal, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so teardown has to wait, then SIGKILL
time.sleep(delay)  # a slow start keeps the sandbox stage busy
class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep({SLOW_S} if self.path == "/slow" else 0)
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.ThreadingHTTPServer(("127.0.0.1", port), Slow).serve_forever()
'''

# The Kubernetes sandbox: a Deployment and its Service, a migration Job the sandbox waits for
# (it runs MIGRATE_S), and a ConfigMap whose finalizer an operator releases CLEANUP_S after its
# deletion (so deleting the namespace, the teardown, takes that long).
MIGRATE_S, TRAIN_S, CLEANUP_S = 4.0, 6.0, 4.0
# In the clouds: how long a SageMaker endpoint or a TPU node is being created (it is being
# deleted for CLEANUP_S).
CREATE_S = 4.0
SLOW_FINALIZER = "mlci.test/slow-cleanup"
K8S_SANDBOX = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: "example.test/web:1"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 8080}}]
---
apiVersion: batch/v1
kind: Job
metadata: {{name: migrate}}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{{name: migrate, image: "example.test/web:1"}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: state, finalizers: [{SLOW_FINALIZER}]}}
data: {{sandbox: "${{sandbox.id}}"}}
"""
K8S_TRAIN = """
apiVersion: batch/v1
kind: Job
metadata: {name: train}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: train, image: "example.test/web:1"}]
"""


def _write_config(root: Path, sandbox: dict[str, Any], pipeline: dict[str, Any],
                  inputs: list[str], settings: dict[str, Any] | None = None,
                  before: tuple[dict[str, Any], ...] = ()) -> Path:
    """Config `inject` on engine e1: a 4 s image build, then `sandbox`, the pipelines `before`
    and `pipeline`, and a ui_smoke route to /slow on the sandbox's service `web`."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "mlci.yaml").write_text(yaml.safe_dump({"engines": {"e1": {}}, **(settings or {})}))
    config = {
        "name": "inject", "owners": {"default": "ops"},
        "image": {"build": {"command": [PY, "-c", "import time; time.sleep(4)",
                                        markers(root)[0]],
                            "inputs": inputs}},
        "sandbox": sandbox, "pipelines": [*before, pipeline],
        "ui_smoke": {"routes": [{"service": "web", "path": "/slow", "timeout_s": 20}]},
    }
    (root / "configs" / "inject.yaml").write_text(yaml.safe_dump(config))
    return root


def _local_pipeline(root: Path) -> dict[str, Any]:
    """A 4 s command pipeline on this machine that leaves a child behind if it is killed."""
    return {"kind": "command", "name": "train", "command": [
        PY, "-c", "import subprocess, time; subprocess.Popen(['sleep', '600']); "
        "time.sleep(4)", markers(root)[0]]}


def write_registry(root: Path) -> Path:
    """Config `inject` on the local provider: every stage takes a few seconds, so a kill lands
    inside it."""
    root.mkdir(parents=True)
    (root / "slow_server.py").write_text(SLOW_SERVER)
    return _write_config(root, {"services": [{
        "name": "web", "command": [PY, str(root / "slow_server.py"), "${port}", "3"],
        "ready": {"http": {"path": "/"}}}]}, _local_pipeline(root), ["slow_server.py"])


def write_kubernetes_registry(root: Path, kubeconfig: Path) -> Path:
    """Config `inject` on the Kubernetes provider, for the cluster `emulated_cluster` paces:
    every stage takes a few seconds, so a kill lands inside it."""
    (root / "k8s").mkdir(parents=True)
    (root / "k8s" / "sandbox.yaml").write_text(K8S_SANDBOX)
    (root / "k8s" / "train.yaml").write_text(K8S_TRAIN)
    return _write_config(root, {
        "provider": "kubernetes", "cluster": {"kubeconfig": str(kubeconfig)},
        "manifests": ["k8s/sandbox.yaml"],
        "ready": [{"kind": "Deployment", "name": "web"}, {"kind": "Job", "name": "migrate"}],
        "services": [{"name": "web", "service": "web", "port": 8080}]},
        {"kind": "k8s_job", "name": "train", "manifest": "k8s/train.yaml"}, ["k8s/*.yaml"])


def write_sagemaker_registry(root: Path, endpoint_url: str) -> Path:
    """Config `inject` on the SageMaker provider at `endpoint_url` (`emulated_sagemaker`'s):
    the endpoint is Creating, then Deleting, for a few seconds; the pipelines invoke it, then
    run 4 s on this machine; ui_smoke's /slow is answered by the proxy."""
    root.mkdir(parents=True)
    (root / "inputs.txt").write_text("inject\n")
    return _write_config(root, {
        "provider": "aws-sagemaker", "region": REGION, "endpoint_url": endpoint_url,
        "execution_role_arn": ROLE, "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/"
        "inject:1", "services": [{"name": "web"}]}, _local_pipeline(root), ["inputs.txt"],
        before=({"kind": "sagemaker_invoke", "name": "invoke", "payload": {"x": 1}},))


@contextlib.contextmanager
def emulated_sagemaker(home: Path) -> Iterator[str]:
    """moto's server and the pacing proxy in front of it (an endpoint Creating for CREATE_S,
    Deleting for CLEANUP_S, /slow answered after SLOW_S), fake credentials in the
    environment; yields the proxy's URL, the endpoint URL of `write_sagemaker_registry`."""
    home.mkdir(parents=True, exist_ok=True)
    with moto_server(home / "moto.log") as url, \
            PacedSageMaker(url, create_s=CREATE_S, delete_s=CLEANUP_S, slow_s=SLOW_S) as api, \
            environment_set(FAKE_CREDENTIALS, REAL_CREDENTIALS):
        yield api.url


@dataclass(frozen=True)
class LoopbackTpu:
    """Where `emulated_tpu`'s services listen, for `write_tpu_registry`."""

    api_url: str
    ssh_port: int
    ssh_user: str
    web_port: int
    project: str = "mlci-inject"
    zone: str = "us-central2-b"


TPU_KEY_ENV = "MLCI_TPU_SSH_KEY"


def write_tpu_registry(root: Path, tpu: LoopbackTpu) -> Path:
    """Config `inject` on the TPU VM provider, for `emulated_tpu`: the node is CREATING, then
    DELETING, for a few seconds; the pipeline runs 6 s on the "VM" over SSH; ui_smoke's /slow
    is a port on the VM."""
    root.mkdir(parents=True)
    (root / "inputs.txt").write_text("inject\n")
    return _write_config(root, {
        "provider": "gcp-tpu-vm", "project": tpu.project, "zone": tpu.zone,
        "accelerator_type": "v4-8", "runtime_version": "tpu-ubuntu2204-base", "spot": True,
        "api_endpoint": tpu.api_url, "state_poll_s": 0.5,
        "ssh": {"user": tpu.ssh_user, "private_key_env": TPU_KEY_ENV, "port": tpu.ssh_port},
        "services": [{"name": "web", "port": tpu.web_port}]},
        {"kind": "ssh_command", "name": "train",
         "command": [PY, "-c", f"import time; time.sleep({TRAIN_S})", markers(root)[1]]},
        ["inputs.txt"], settings={"secrets": [TPU_KEY_ENV]})


@contextlib.contextmanager
def emulated_tpu(home: Path) -> Iterator[LoopbackTpu]:
    """The loopback Cloud TPU API (a node CREATING for CREATE_S, DELETING for CLEANUP_S), a
    real sshd standing in for the VM, its key in MLCI_TPU_SSH_KEY, and the VM's `web` port
    (/slow answered after SLOW_S)."""
    with _slow_backend() as web_port, \
            TpuApiServer(TpuState(create_s=CREATE_S, delete_s=CLEANUP_S)) as api, \
            LoopbackSshd(home / "sshd") as sshd, environment_set({TPU_KEY_ENV: sshd.private_key}):
        yield LoopbackTpu(api.url, sshd.port, sshd.user, web_port)


class _SlowBackend(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        time.sleep(SLOW_S if self.path == "/slow" else 0)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _slow_backend() -> Iterator[int]:
    """`_SlowBackend` on a free loopback port; yields the port."""
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _SlowBackend)
    threading.Thread(target=backend.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield backend.server_address[1]
    finally:
        backend.shutdown()
        backend.server_close()


def _release_slow_finalizers(api: KubeApiServer, stop: threading.Event) -> None:
    """The operator owning SLOW_FINALIZER: releases it CLEANUP_S after an object's deletion."""
    deleting: dict[str, float] = {}
    while not stop.wait(0.1):
        for obj in api.objects("ConfigMap"):
            meta = obj["metadata"]
            if SLOW_FINALIZER not in meta.get("finalizers", []) or \
                    not meta.get("deletionTimestamp"):
                continue
            if time.monotonic() - deleting.setdefault(meta["uid"], time.monotonic()) >= CLEANUP_S:
                with contextlib.suppress(ApiError):  # gone meanwhile
                    api.store.patch(TYPES["ConfigMap"], meta["namespace"], meta["name"],
                                    {"metadata": {"finalizers": None}},
                                    "application/merge-patch+json")


@contextlib.contextmanager
def emulated_cluster(home: Path, train_s: float = TRAIN_S) -> Iterator[Path]:
    """The loopback Kubernetes API emulator and its controller, paced for
    `write_kubernetes_registry`: the migration Job runs MIGRATE_S, `train` `train_s`, the
    service `web` (in any namespace) answers /slow after SLOW_S, the slow finalizer goes
    CLEANUP_S after a deletion. Yields its kubeconfig, written under `home`."""
    stop = threading.Event()
    try:
        with _slow_backend() as web_port, KubeApiServer() as api, \
                KubeController(api) as controller:
            controller.behave("Job", "migrate", run_s=MIGRATE_S)
            controller.behave("Job", "train", run_s=train_s)
            api.route_service(None, "web", f"http://127.0.0.1:{web_port}")
            threading.Thread(target=_release_slow_finalizers, args=(api, stop),
                             daemon=True).start()
            home.mkdir(parents=True, exist_ok=True)
            yield api.kubeconfig(home / "kubeconfig.json")
            assert not controller.errors, controller.errors
    finally:
        stop.set()


PROVIDERS = ("local", "kubernetes", "aws-sagemaker", "gcp-tpu-vm")


@contextlib.contextmanager
def registry_on(provider: str, tmp: Path) -> Iterator[Path]:
    """The registry of config `inject` on `provider` (one of PROVIDERS), written under `tmp`,
    with its emulated API running (its state under `tmp / "cloud"`) until the exit."""
    if provider == "local":
        yield write_registry(tmp / "registry")
        return
    emulated, write = {
        "kubernetes": (emulated_cluster, write_kubernetes_registry),
        "aws-sagemaker": (emulated_sagemaker, write_sagemaker_registry),
        "gcp-tpu-vm": (emulated_tpu, write_tpu_registry),
    }[provider]
    with emulated(tmp / "cloud") as where:
        yield write(tmp / "registry", where)


def until_empty(listing: Callable[[], list[str]], settle_s: float) -> list[str]:
    """What `listing` lists, asked again for up to `settle_s` until it is empty."""
    deadline = time.monotonic() + settle_s
    while (found := listing()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def listed_namespaces(kubeconfig: Path, run_id: str, settle_s: float = 0) -> list[str]:
    """The run's mlci namespaces the API server lists, through the `kubernetes` client
    (Terminating ones too); waits up to `settle_s` for the list to empty."""
    with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api:
        return until_empty(lambda: [ns.metadata.name for ns in k8s.CoreV1Api(api).list_namespace(
            label_selector=f"{MLCI_NAMESPACES},mlci.dev/run-id={run_id}").items], settle_s)


def injected_processes(marker: str) -> list[int]:
    """Builds and pipelines of the injected config still alive (their argv carries `marker`)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if marker in (proc.info["cmdline"] or []) and \
                    proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def stage_in_progress(instance: dg.DagsterInstance, run_id: str, stage: str) -> bool:
    """Whether `stage` has begun in the run: the stage before it is materialized and its check
    evaluated, the last event Dagster stores before it hands back to the lifecycle (the image
    stage: the lifecycle step has started). An interrupt while Dagster still stores the events
    of a stage reaches it outside the lifecycle's code (see the README's Operations)."""
    if stage == STAGES[0]:
        return any(instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START))
    previous = str(STAGES[STAGES.index(stage) - 1])
    return any(e.dagster_event.event_specific_data.asset_key.to_user_string() == previous
               for e in instance.all_logs(
                   run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION))


def leaks(home: Path, handles: list[dict], sandbox_ids: set[str], marker: str
          ) -> dict[str, list]:
    return {
        "processes": [p for s in sandbox_ids for p in marked_processes("MLCI_SANDBOX_ID", s)],
        "orphans": injected_processes(marker),
        "ports": [p for h in handles for p in h["ports"].values() if not port_is_free(p)],
        "directories": [str(d) for d in (home / "mlci").glob("sandboxes/*")],
        "ledger": [p.name for p in (home / "mlci").glob("ledger/*.json")],
    }


def cloud_listing(registry: Path) -> Callable[[str, float], dict[str, list[str]]]:
    """How to ask the provider `inject` runs on, through its own API, what a run left (waiting
    up to `settle_s` for it to empty): the run's namespaces, its tagged SageMaker resources, its
    labelled TPU nodes. Nothing to ask on the local provider."""
    sandbox = load_registry(registry).configs["inject"].config.sandbox
    if sandbox.provider == "kubernetes":
        kubeconfig = registry / (sandbox.cluster.kubeconfig or os.environ["KUBECONFIG"])
        return lambda run_id, settle_s: {
            "namespaces": listed_namespaces(kubeconfig, run_id, settle_s)}
    if sandbox.provider == "aws-sagemaker":
        return lambda run_id, settle_s: {"sagemaker": until_empty(
            lambda: tagged_resources(sandbox.endpoint_url, sandbox.region, run_id), settle_s)}
    if sandbox.provider == "gcp-tpu-vm":
        return lambda run_id, settle_s: {"tpu_nodes": until_empty(
            lambda: listed_nodes(sandbox.api_endpoint, sandbox.project, sandbox.zone, run_id),
            settle_s)}
    return lambda run_id, settle_s: {}


def stage_running(instance: dg.DagsterInstance, run_id: str) -> str:
    """The first stage the run has not materialized: the one a kill now lands in."""
    done = {e.asset_materialization.asset_key.to_user_string() for e in instance.all_logs(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION) if e.asset_materialization}
    return next((str(s) for s in STAGES if str(s) not in done), RESULTS_ASSET.to_user_string())


def inject(stage: str, home: Path, registry: Path, timeout_s: float = 60) -> dict[str, Any]:
    """SIGKILLs the lifecycle's worker mid-`stage`, runs the cleanup layers; returns what was
    left before and after them, and how the run and its results ended."""
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    run_id = str(uuid.uuid4())
    in_the_cloud = cloud_listing(registry)
    marker, vm_marker = markers(registry)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("config", ["inject"])
        worker = subprocess.Popen(
            [PY, "-m", "mlci_dagster.worker", str(registry), KEY, run_id, "manual"],
            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not (instance.has_run(run_id) and stage_in_progress(instance, run_id, stage)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage {stage} never started")
                time.sleep(0.1)
            time.sleep(1.0)  # well inside the stage
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        killed_in = stage_running(instance, run_id)
        time.sleep(0.5)  # let pdeathsig take the build or pipeline down with the worker
        handles = [yaml.safe_load(p.read_text()) for p in (home / "mlci").glob("ledger/*.json")]
        sandbox_ids = {p.name for p in (home / "mlci").glob("logs/*")}

        def left_now(settle_s: float = 0) -> dict[str, list]:
            """What is left here, and what the provider's API still lists of the run."""
            return {**leaks(home, handles, sandbox_ids, marker),
                    **in_the_cloud(run_id, settle_s)}

        # A pipeline's process on the TPU "VM" outlives the crash; on a real VM it goes with
        # the node, here (the VM is this machine) it is only shown, then killed below.
        left_by_crash = {**left_now(), "vm_processes": injected_processes(vm_marker)}

        resources = build_definitions(registry).resources
        # Layer 2: the janitor ends the run whose worker is gone and reaps its sandboxes.
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            sandbox_janitor(context)
        # Layer 3: the failure sensor, as the daemon runs it for the now failed run.
        run = instance.get_run_by_id(run_id)
        failure = next(iter(instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)),
                       None)
        if failure is not None and failure.dagster_event is not None:
            with dg.build_run_status_sensor_context(
                    sensor_name="teardown_after_failure", dagster_event=failure.dagster_event,
                    dagster_instance=instance, dagster_run=run,
                    resources=resources) as context:
                teardown_after_failure(context.for_run_failure())
        left = left_now(SETTLE_S)
        results = instance.fetch_materializations(RESULTS_ASSET, limit=5).records
    leftovers = left["processes"] + left["orphans"] + injected_processes(vm_marker)
    for pid in leftovers:  # leave the machine clean regardless
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return {"stage": stage, "killed_in": killed_in, "sandboxes": len(sandbox_ids),
            "left_by_crash": sum(len(v) for v in left_by_crash.values()),
            "crash_details": left_by_crash,
            "leaks": sum(len(v) for v in left.values()), "details": left,
            "run_status": run.status if run else None, "results": len(results)}
