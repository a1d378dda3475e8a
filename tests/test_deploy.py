"""deploy/: the production instance (dagster.yaml), the code-location image (Dockerfile) and the
official Dagster Helm chart's values, held to each other; and dagster-k8s's K8sRunLauncher, as
deploy/dagster.yaml configures it, launching a run from a real webserver and daemon into the
loopback Kubernetes API emulation (tests/support/kube_wire.py: the official client's wire
protocol; its controller, tests/support/kube_controller.py, plays the Job controller and
kubelet, no container runs), where run monitoring sees the Job fail and marks the run failed."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from mlci_dagster import cli
from mlci_dagster.definitions import HISTORY_JOB
from mlci_dagster.launch.coordinator import PoolTaggingRunCoordinator
from mlci_dagster.vocabulary import POOL_TAG
from tests.support.dagster_services import LAUNCH_RUN, daemon, graphql, wait_until, webserver
from tests.support.kube_controller import KubeController
from tests.support.kube_rbac import Attributes, Policy, User
from tests.support.kube_wire import KubeApiServer
from tests.support.registries import PY
from tests.support.services import HADOLINT, YAMLLINT, require

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
INSTANCE = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
VALUES = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
LAUNCHER = INSTANCE["run_launcher"]["config"]
HELM_LAUNCHER = VALUES["runLauncher"]["config"]["k8sRunLauncher"]
IMAGE = VALUES["dagster-user-deployments"]["deployments"][0]["image"]
IMAGE_REF = f"{IMAGE['repository']}:{IMAGE['tag']}"
PG_ENV = {"DAGSTER_PG_HOST": "db.example", "DAGSTER_PG_PORT": "5432",
          "DAGSTER_PG_USERNAME": "mlci", "DAGSTER_PG_PASSWORD": "s3cret", "DAGSTER_PG_DB": "mlci"}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


# --- the files agree -------------------------------------------------------------------------


def test_deploy_dagster_yaml_is_a_valid_instance_of_postgres_queue_launcher_and_monitoring(
        tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    settings, _ = dagster_instance_config(str(home))  # raises on a field Dagster does not know

    # Each part's own config schema, with the environment variables resolved.
    storage = settings["storage"]["postgres"]
    for part in (PostgresRunStorage, PostgresEventLogStorage, PostgresScheduleStorage):
        assert process_config(part.config_type(), storage).success, part
    checked = process_config(PoolTaggingRunCoordinator.config_type(),
                             settings["run_coordinator"]["config"])
    assert checked.success, checked.errors
    launcher = process_config(K8sRunLauncher.config_type(), settings["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    assert settings["run_launcher"]["class"] == "K8sRunLauncher"
    assert settings["run_monitoring"]["enabled"] is True
    # No secret in the file: the password is read from the environment.
    assert storage["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}


def test_helm_values_configure_what_deploy_dagster_yaml_configures():
    coordinator = VALUES["dagsterDaemon"]["runCoordinator"]
    custom = coordinator["config"]["customRunCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "CustomRunCoordinator"
    assert (custom["module"], custom["class"]) == (INSTANCE["run_coordinator"]["module"],
                                                    INSTANCE["run_coordinator"]["class"])
    assert custom["config"] == INSTANCE["run_coordinator"]["config"]

    monitoring = VALUES["dagsterDaemon"]["runMonitoring"]
    assert {"enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"]
            } == INSTANCE["run_monitoring"]

    assert VALUES["runLauncher"]["type"] == "K8sRunLauncher"
    assert HELM_LAUNCHER["jobNamespace"] == LAUNCHER["job_namespace"]
    assert HELM_LAUNCHER["imagePullPolicy"] == LAUNCHER["image_pull_policy"]
    assert HELM_LAUNCHER["loadInclusterConfig"] == LAUNCHER["load_incluster_config"]
    assert [s["name"] for s in HELM_LAUNCHER["envSecrets"]] == LAUNCHER["env_secrets"]
    assert HELM_LAUNCHER["envVars"] == LAUNCHER["env_vars"]
    assert HELM_LAUNCHER["labels"] == LAUNCHER["labels"]
    # The chart names the launcher's service account and the instance ConfigMap.
    assert VALUES["serviceAccount"]["name"] == LAUNCHER["service_account_name"]
    assert f"{VALUES['fullnameOverride']}-instance" == LAUNCHER["instance_config_map"]

    postgres = VALUES["postgresql"]
    assert not postgres["enabled"] and postgres["service"]["port"] == 5432
    assert postgres["postgresqlScheme"] == INSTANCE["storage"]["postgres"]["postgres_db"][
        "scheme"]
    assert VALUES["global"]["postgresqlSecretName"] and not postgres["postgresqlPassword"]

    # One image everywhere: the daemon and webserver load mlci_dagster.launch.coordinator.
    for part in (VALUES["dagsterDaemon"], VALUES["dagsterWebserver"]):
        assert part["image"] == IMAGE
    env = dockerfile_env()
    assert env["DAGSTER_HOME"] == LAUNCHER["dagster_home"]
    [deployment] = VALUES["dagster-user-deployments"]["deployments"]
    for part in (deployment, VALUES["dagsterDaemon"], VALUES["dagsterWebserver"]):
        assert {"name": "MLCI_REGISTRY", "value": env["MLCI_REGISTRY"]} in part["env"]
        assert part["envSecrets"] == HELM_LAUNCHER["envSecrets"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert "mlci_dagster.definitions" in deployment["codeServerArgs"]


def test_mlci_helm_values_are_the_registrys_pool_limits(tmp_path):
    """What `mlci sync` writes into a writable dagster.yaml, as chart values."""
    done = subprocess.run([PY, "-m", "mlci_dagster.cli", "--registry",
                           str(ROOT / "examples" / "aws-sagemaker"), "helm-values"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    values = yaml.safe_load(done.stdout)
    limits = [{"key": POOL_TAG, "value": "aws-sagemaker", "limit": 2}]
    assert values == {"dagsterDaemon": {"runCoordinator": {"config": {"customRunCoordinator": {
        "config": {"tag_concurrency_limits": limits}}}}}}
    # Where deploy/helm/values.yaml holds them (a second -f merges into it, key by key).
    custom = VALUES["dagsterDaemon"]["runCoordinator"]["config"]["customRunCoordinator"]
    assert custom["config"]["tag_concurrency_limits"] == []
    assert "concurrency" not in VALUES  # whose limits Dagster would take over the coordinator's


def test_mlci_sync_on_a_read_only_instance_file_says_to_use_helm_values(tmp_path, monkeypatch,
                                                                         capsys):
    """The chart mounts dagster.yaml from a ConfigMap, read-only (EROFS even for root)."""
    home = tmp_path / "home"
    home.mkdir()
    instance_file = home / "dagster.yaml"
    instance_file.write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    write_text = Path.write_text

    def read_only(self: Path, *args, **kwargs):
        if self == instance_file:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    code = cli.main(["--registry", str(ROOT / "examples" / "aws-sagemaker"), "sync"])
    err = capsys.readouterr().err
    assert code == 0  # the partitions are synced all the same
    assert "pool limits differ" in err and "mlci helm-values" in err
    assert "Read-only file system" in err


def test_dockerfile_copies_what_exists_and_runs_the_code_location():
    instructions = dockerfile()
    assert instructions[0][0] == "FROM" and re.search(r":\d+\.\d+\.\d+", instructions[0][1])
    env = dockerfile_env()
    default_registry = next(a.split("=", 1)[1] for i, a in instructions
                            if i == "ARG" and a.startswith("REGISTRY="))
    for instruction, args in instructions:
        if instruction == "COPY":
            *sources, _ = args.split()
            for source in sources:
                source = source.replace("${REGISTRY}", default_registry)
                assert (ROOT / source).exists(), f"deploy/Dockerfile: COPY {source}: no such path"
    assert (ROOT / default_registry / "mlci.yaml").exists()
    assert env["MLCI_REGISTRY"] == "/opt/mlci/registry"
    cmd = next(yaml.safe_load(a) for i, a in instructions if i == "CMD")
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("--module-name") + 1] == "mlci_dagster.definitions"
    assert cmd[cmd.index("--port") + 1] == str(VALUES["dagster-user-deployments"][
        "deployments"][0]["port"])


def test_dockerfile_passes_hadolint():
    require(HADOLINT)
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_yaml_files_pass_yamllint():
    require(YAMLLINT)
    yamllint = Path(sys.executable).parent / "yamllint"
    rules = "{extends: default, rules: {line-length: {max: 100}, document-start: disable}}"
    files = [DEPLOY / "dagster.yaml", DEPLOY / "helm" / "values.yaml", DEPLOY / "rbac.yaml"]
    done = subprocess.run([str(yamllint), "-s", "-d", rules, *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


RBAC_OBJECTS = [d for d in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()) if d]
RUN_ACCOUNT = User.service_account(LAUNCHER["job_namespace"], LAUNCHER["service_account_name"])


def run_account_may(verb: str, resource: str, namespace: str = "sandbox-1", group: str = "",
                    subresource: str = "", name: str = "") -> bool:
    return Policy.from_objects(RBAC_OBJECTS).allows(RUN_ACCOUNT, Attributes(
        verb, "", True, group, "v1", namespace, resource, subresource, name))


def test_rbac_yaml_binds_the_run_pods_account_without_wildcards():
    [binding] = [o for o in RBAC_OBJECTS if o["kind"] == "ClusterRoleBinding"]
    [role] = [o for o in RBAC_OBJECTS if o["kind"] == "ClusterRole"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": LAUNCHER[
        "job_namespace"], "name": LAUNCHER["service_account_name"]}]
    for rule in role["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule


@pytest.mark.parametrize("verb, resource, namespace, group, subresource", [
    ("get", "secrets", "sandbox-1", "", ""),
    ("list", "secrets", "mlci", "", ""),
    ("watch", "secrets", "kube-system", "", ""),
    ("create", "pods", "sandbox-1", "", "exec"),
    ("create", "serviceaccounts", "kube-system", "", "token"),
    ("create", "services", "sandbox-1", "", "proxy"),  # UI smoke routes are GETs
    ("escalate", "roles", "sandbox-1", "rbac.authorization.k8s.io", ""),
    ("bind", "clusterroles", "sandbox-1", "rbac.authorization.k8s.io", ""),
    ("create", "clusterrolebindings", "", "rbac.authorization.k8s.io", ""),
    ("impersonate", "serviceaccounts", "kube-system", "", ""),
    ("update", "deployments", "sandbox-1", "apps", ""),
])
def test_rbac_yaml_lets_the_run_account_read_no_secret_nor_escalate(verb, resource, namespace,
                                                                    group, subresource):
    assert not run_account_may(verb, resource, namespace, group, subresource)


@pytest.mark.parametrize("verb, resource, namespace, group, subresource", [
    ("create", "namespaces", "", "", ""),
    ("list", "namespaces", "", "", ""),  # the janitor
    ("create", "secrets", "sandbox-1", "", ""),
    ("get", "pods", "sandbox-1", "", "log"),
    ("get", "services", "sandbox-1", "", "proxy"),
    ("create", "roles", "sandbox-1", "rbac.authorization.k8s.io", ""),
    ("delete", "sparkapplications", "sandbox-1", "sparkoperator.k8s.io", ""),
])
def test_rbac_yaml_lets_the_run_account_run_a_sandbox(verb, resource, namespace, group,
                                                      subresource):
    """A few of the provider's calls; tests/test_kubernetes_lifecycle.py runs them all as this
    account."""
    assert run_account_may(verb, resource, namespace, group, subresource)


def test_helm_values_render_with_the_official_chart():
    # An opt-in, skipped in CI too: the chart cannot be fetched without the internet.
    chart = os.environ.get("MLCI_DAGSTER_CHART")
    if not shutil.which("helm") or not chart:
        pytest.skip("helm and the dagster chart cannot be fetched here (no internet beyond the "
                    "package registries): set MLCI_DAGSTER_CHART to a local copy of the chart "
                    "and put helm on PATH to render deploy/helm/values.yaml")
    rendered = subprocess.run(["helm", "template", "mlci", chart, "--namespace", "mlci", "-f",
                               str(DEPLOY / "helm" / "values.yaml")], capture_output=True,
                              text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
    [instance] = [o for o in objects if o["kind"] == "ConfigMap"
                  and o["metadata"]["name"] == LAUNCHER["instance_config_map"]]
    rendered_instance = yaml.safe_load(instance["data"]["dagster.yaml"])
    assert rendered_instance["run_coordinator"]["class"] == INSTANCE["run_coordinator"]["class"]
    assert rendered_instance["run_launcher"]["config"]["env_secrets"] == LAUNCHER["env_secrets"]


# --- K8sRunLauncher against the emulated API --------------------------------------------------


@pytest.mark.daemon
def test_k8s_run_launcher_creates_the_job_and_run_monitoring_fails_the_run(tmp_path,
                                                                          monkeypatch):
    """The UI's Launch button (GraphQL) → the queue → the daemon's K8sRunLauncher, configured
    as deploy/dagster.yaml says except that it reaches the API through a kubeconfig instead of
    in-cluster config and monitoring polls every second; storage is SQLite here (the Postgres
    tests cover storage). The Job's pod "runs" for a few seconds and exits 1, as a run worker
    whose pod died; the run had reported its start, as a run worker does."""
    registry = ROOT / "examples" / "local"
    with KubeApiServer() as api, KubeController(api) as controller:
        controller.behave("Job", "dagster-run-*", failure="fail", run_s=8)
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig.json")
        with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as client:
            k8s.CoreV1Api(client).create_namespace(
                {"metadata": {"name": LAUNCHER["job_namespace"]}})

        settings = dict(INSTANCE)
        settings.pop("storage")
        settings["run_launcher"] = {**INSTANCE["run_launcher"], "config": {
            **LAUNCHER, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}}
        settings["run_monitoring"] = {**INSTANCE["run_monitoring"], "poll_interval_seconds": 1}
        home = tmp_path / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        # The chart sets DAGSTER_CURRENT_IMAGE on the user deployment: the code server reports
        # it as the run's image, and the launcher starts the Job with it.
        monkeypatch.setenv("DAGSTER_CURRENT_IMAGE", IMAGE_REF)
        with dg.DagsterInstance.from_config(str(home)) as instance, \
                webserver(home, registry, tmp_path / "webserver.log") as url, \
                daemon(home, registry, tmp_path / "daemon.log"):
            selector = {"repositoryLocationName": "mlci_dagster.definitions",
                        "repositoryName": "__repository__", "jobName": HISTORY_JOB}
            launched = graphql(url, LAUNCH_RUN, {"params": {"selector": selector}})[
                "launchPipelineExecution"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            job_name = f"dagster-run-{run_id}"
            [job] = wait_until(lambda: [j for j in api.objects("Job", LAUNCHER["job_namespace"])
                                        if j["metadata"]["name"] == job_name], 120,
                               "the run's Job", tmp_path / "daemon.log")
            # As the run worker in the pod would: RUN_START.
            instance.report_dagster_event(DagsterEvent(
                DagsterEventType.RUN_START.value, job_name=HISTORY_JOB), run_id)
            failed = wait_until(
                lambda: (r := instance.get_run_by_id(run_id)).is_finished and r, 120,
                "run monitoring to end the run", tmp_path / "daemon.log")
            messages = [e.message or "" for e in instance.all_logs(run_id)]
        assert controller.errors == []

    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["image"] == IMAGE_REF
    assert container["imagePullPolicy"] == LAUNCHER["image_pull_policy"]
    assert container["args"][:3] == ["dagster", "api", "execute_run"]
    assert spec["serviceAccountName"] == LAUNCHER["service_account_name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DAGSTER_HOME"] == LAUNCHER["dagster_home"]
    assert env["MLCI_REGISTRY"] == str(registry)  # env_vars: passed on from the daemon
    assert env["DAGSTER_RUN_JOB_NAME"] == HISTORY_JOB
    secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    assert secrets == LAUNCHER["env_secrets"]
    # The run worker gets the instance it runs on (this launcher and coordinator) in its args.
    assert "K8sRunLauncher" in container["args"][3]
    assert "PoolTaggingRunCoordinator" in container["args"][3]
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["dagster/run-id"] == run_id
        for key, value in LAUNCHER["labels"].items():
            assert labels[key] == value

    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert any("K8s job" in m for m in messages), messages[-5:]
