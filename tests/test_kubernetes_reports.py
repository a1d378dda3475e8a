"""A `k8s_job`'s test reports, collected through the API server alone: the sidecar the provider
adds to the Job's pod, the volume it shares with every container, and its log read back into
files, against the project's emulation of the API server (tests/support/kube_wire.py on
loopback, spoken to by the official `kubernetes` client; its controller plays the kubelet, and
runs the sidecar's shell script for real over the files a test says the Job wrote); the
decoding of that log and the editing of the pod template as tables; the registry's refusal of a
path a pod cannot share."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from mlci_dagster.junit.read import read_report
from mlci_dagster.providers.base import ReportError, report_copy_path
from mlci_dagster.providers.handle import SandboxHandle, render_context
from mlci_dagster.providers.kubernetes import KubernetesProvider, reports
from mlci_dagster.providers.kubernetes.manifests import ManifestError
from mlci_dagster.providers.kubernetes.reports import (
    MARKER,
    SIDECAR,
    IncompleteLog,
    decode_reports,
    with_report_sidecar,
)
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.registry.kubernetes import (
    REPORT_IMAGE,
    ClusterSpec,
    K8sJobPipeline,
    KubernetesSandbox,
)
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.lifecycle import run_lifecycle
from mlci_dagster.vocabulary import FailureKind
from tests.support.kube_store import TYPES
from tests.support.kube_wire import KubeApiServer
from tests.support.registries import config, write_registry

PYTEST_REPORT = (Path(__file__).parent / "fixtures" / "junit" / "pytest-9.2.0.xml").read_bytes()
IMAGE = {"ref": "example.test/app@sha256:abc123", "digest": "sha256:abc123"}
SETTINGS = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {sandbox: "${sandbox.id}"}
"""
# Two main containers and a regular init container: the reports' volume goes in each of them.
TRAIN_JOB = """
apiVersion: batch/v1
kind: Job
metadata: {name: train}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      initContainers:
      - {name: fetch-data, image: "busybox:1.37.0", command: [sh, -c, "echo fetched"]}
      containers:
      - name: train
        image: "${image.ref}"
        command: [python, -m, pytest, --junitxml=/reports/junit.xml]
      - {name: metrics, image: "${image.ref}", command: [python, /app/metrics.py]}
"""


# --- against the emulated API server -------------------------------------------------------------

@pytest.fixture
def registry(tmp_path: Path, kube) -> Path:
    """A registry whose config `tested` runs the Job `train`, declaring its report."""
    root = write_registry(tmp_path / "registry", [config(
        "tested", image={"ref": IMAGE["ref"]}, ui_smoke={},
        sandbox={"provider": "kubernetes", "cluster": {"kubeconfig": "kubeconfig.json"},
                 "manifests": ["k8s/settings.yaml"]},
        pipelines=[{"kind": "k8s_job", "name": "train", "manifest": "k8s/train.yaml",
                    "reports": [{"path": "/reports/*.xml"}]}])])
    (root / "k8s").mkdir()
    (root / "k8s" / "settings.yaml").write_text(SETTINGS)
    (root / "k8s" / "train.yaml").write_text(TRAIN_JOB)
    kube[0].kubeconfig(root / "kubeconfig.json")
    return root


@pytest.fixture
def provider(tmp_path: Path, registry: Path) -> KubernetesProvider:
    return KubernetesProvider(tmp_path / "home", root=registry,
                              settings=ClusterSpec(kubeconfig="kubeconfig.json"),
                              poll_interval_s=0.05)


def job_pipeline(**overrides: Any) -> K8sJobPipeline:
    return K8sJobPipeline.model_validate({"kind": "k8s_job", "name": "train",
                                          "manifest": "k8s/train.yaml",
                                          "reports": [{"path": "/reports/*.xml"}], **overrides})


def run_job(provider: KubernetesProvider, pipeline: K8sJobPipeline | None = None
            ) -> tuple[SandboxHandle, K8sJobPipeline]:
    pipeline = pipeline or job_pipeline()
    handle = create(provider)
    provider.run_pipeline(handle, pipeline, render_context(handle, {}, image=IMAGE, outputs={}),
                          timeout_s=15)
    return handle, pipeline


def create(provider: KubernetesProvider) -> SandboxHandle:
    spec = KubernetesSandbox.model_validate({
        "provider": "kubernetes", "cluster": {"kubeconfig": "kubeconfig.json"},
        "manifests": ["k8s/settings.yaml"]})
    return provider.create(spec, config="tested", engine="e1", run_id="run-1",
                           engine_variables={}, teardown_s=60, image=IMAGE)


def lifecycle(registry: Path, home: Path) -> dict[str, Any]:
    ctx = LifecycleContext.create(load_registry(registry), "tested", "e1", "run-1", home)
    return {str(o.stage): o for o in run_lifecycle(ctx)}


def test_the_report_a_failing_job_wrote_gives_each_test_its_result(kube, registry, tmp_path):
    server, controller = kube
    controller.behave("Job", "train", failure="fail",
                      files={"/reports/junit.xml": PYTEST_REPORT})

    outcomes = lifecycle(registry, tmp_path / "home")

    runs = outcomes["pipeline_runs"]
    assert (str(runs.status), str(runs.failure_kind)) == ("fail", "product")
    assert runs.details.pipelines[0].summary.startswith("Job train failed")
    tests = runs.details.tests["train"]
    assert tests.problems == []
    assert tests.counts.model_dump() == {"passed": 4, "failed": 1, "errors": 1, "skipped": 2}
    failing = {f.id: f for f in tests.failing}
    accuracy = failing["pytest :: test_model :: test_accuracy_reaches_the_bar"]
    assert accuracy.status == "fail"
    assert accuracy.message.startswith("AssertionError: accuracy 0.81 below 0.9")
    assert failing["pytest :: test_model :: test_experiment_is_listed"].status == "error"
    kept = read_report(Path(tests.report))
    assert kept.problem is None and len(kept.cases) == 8
    assert str(outcomes["teardown"].status) == "pass"
    # The report's base64 is in no log the run keeps: it would carry secrets past the redactor.
    encoded = base64.b64encode(PYTEST_REPORT)[:60].decode()
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file() and path.suffix in (".log", ".json", ".txt"):
            assert encoded not in path.read_text(errors="replace"), path


def test_a_report_written_outside_the_shared_directory_is_a_problem_naming_the_pipeline(
        kube, registry, tmp_path):
    _, controller = kube
    controller.behave("Job", "train", files={"/workspace/junit.xml": PYTEST_REPORT})

    outcomes = lifecycle(registry, tmp_path / "home")

    assert str(outcomes["pipeline_runs"].status) == "pass"  # a report is evidence, not a verdict
    tests = outcomes["pipeline_runs"].details.tests["train"]
    assert tests.problems == [
        "pipeline 'train': reports[0]: no report at /reports/*.xml (the pipeline ended before "
        "writing it, or wrote it elsewhere)"]
    assert tests.counts.model_dump() == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def test_several_files_and_patterns_each_get_their_own(kube, provider, tmp_path):
    _, controller = kube
    one = b'<testsuite name="a"><testcase classname="m" name="t1"/></testsuite>'
    two = b'<testsuite name="b"><testcase classname="m" name="t2"/></testsuite>'
    controller.behave("Job", "train", files={
        "/reports/unit/junit.xml": one, "/reports/e2e/junit.xml": two,
        "/results/TEST-b.xml": two, "/reports/notes.txt": b"not a report"})
    pipeline = job_pipeline(reports=[{"path": "/reports/*/junit.xml"},
                                     {"path": "/results/TEST-*.xml"}])
    handle, _ = run_job(provider, pipeline)

    first = provider.report_files(handle, pipeline, "/reports/*/junit.xml", tmp_path / "0")
    second = provider.report_files(handle, pipeline, "/results/TEST-*.xml", tmp_path / "1")

    assert [p.relative_to(tmp_path / "0").as_posix() for p in first] == [
        "reports/e2e/junit.xml", "reports/unit/junit.xml"]
    assert [p.read_bytes() for p in first] == [two, one]
    assert [p.relative_to(tmp_path / "1").as_posix() for p in second] == ["results/TEST-b.xml"]
    assert provider.destroy(handle, timeout_s=60).clean


def test_the_jobs_pod_template_holds_the_sidecar_and_shares_the_volume_with_every_container(
        kube, provider):
    server, controller = kube
    controller.behave("Job", "train", files={"/reports/junit.xml": PYTEST_REPORT})
    handle, _ = run_job(provider, job_pipeline(report_image="mirror.example/busybox:1.37.0"))

    [job] = server.objects("Job", handle.sandbox_id)
    pod = job["spec"]["template"]["spec"]
    [fetch, sidecar] = pod["initContainers"]
    assert (fetch["name"], sidecar["name"]) == ("fetch-data", SIDECAR)
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["image"] == "mirror.example/busybox:1.37.0"
    assert sidecar["command"][:2] == ["sh", "-c"] and sidecar["args"] == ["/reports/*.xml"]
    assert pod["volumes"] == [{"name": "mlci-reports-0", "emptyDir": {}}]
    for container in [*pod["initContainers"], *pod["containers"]]:
        [mount] = container["volumeMounts"]
        assert (mount["name"], mount["mountPath"]) == ("mlci-reports-0", "/reports"), container
    assert sidecar["volumeMounts"][0]["readOnly"] is True
    # As stored by the API server, against the official schema, strictly.
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    # The pod ran it as the kubelet runs a native sidecar: stopped after the main containers,
    # ending 0 after printing the reports; the pod's phase is its main containers'.
    [ran] = server.objects("Pod", handle.sandbox_id)
    sidecar_status = [s for s in ran["status"]["initContainerStatuses"] if s["name"] == SIDECAR]
    assert sidecar_status[0]["state"]["terminated"]["exitCode"] == 0
    assert ran["status"]["phase"] == "Succeeded"
    assert provider.destroy(handle, timeout_s=60).clean


def _sidecar_log(server: KubeApiServer, namespace: str) -> tuple[str, list[str]]:
    [pod] = server.objects("Pod", namespace)
    name = pod["metadata"]["name"]
    return name, [line for _, line in server.store.log_lines(namespace, name, SIDECAR)]


def _cut_inside_the_frame(lines: list[str]) -> list[str]:
    return lines[:3]


def _garble_the_content(lines: list[str]) -> list[str]:
    return [lines[0], lines[1], "sh: base64: I/O error", *lines[3:]]


def _lose_the_head(lines: list[str]) -> list[str]:
    return lines[4:]


def _lose_the_tail(lines: list[str]) -> list[str]:
    return lines[:-1]


@pytest.mark.parametrize("damage, problem", [
    (_cut_inside_the_frame, "its log ends inside the frame of /reports/junit.xml: the log is cut"),
    (_garble_the_content, "its frame of /reports/junit.xml is garbled: 'sh: base64: I/O error' "
                          "is not base64"),
    (_lose_the_head, "its log lacks its first line: its head is gone"),
    (_lose_the_tail, "its log ends before its last line"),
    (lambda lines: [], "its log is empty"),
], ids=["cut", "garbled", "head-lost", "tail-lost", "empty"])
def test_a_sidecar_log_that_is_not_whole_is_a_problem_naming_the_job_pod_and_file(
        kube, provider, tmp_path, damage, problem):
    server, controller = kube
    controller.behave("Job", "train", files={"/reports/junit.xml": PYTEST_REPORT})
    handle, pipeline = run_job(provider)
    pod, lines = _sidecar_log(server, handle.sandbox_id)
    assert lines[0].startswith(f"{MARKER} ready") and lines[-1] == f"{MARKER} done"
    server.store.set_log(handle.sandbox_id, pod, SIDECAR, "\n".join(damage(lines)))

    with pytest.raises(ReportError) as caught:
        provider.report_files(handle, pipeline, "/reports/*.xml", tmp_path / "into")

    assert str(caught.value).startswith(f"Job train pod {pod} container {SIDECAR}: {problem}")


def test_a_file_larger_than_a_report_may_be_is_left_in_the_pod_and_named(kube, provider,
                                                                         tmp_path, monkeypatch):
    _, controller = kube
    monkeypatch.setattr(reports, "MAX_REPORT_BYTES", 1000)  # what the sidecar is told
    controller.behave("Job", "train", files={"/reports/junit.xml": PYTEST_REPORT})
    handle, pipeline = run_job(provider)

    with pytest.raises(ReportError) as caught:
        provider.report_files(handle, pipeline, "/reports/*.xml", tmp_path / "into")

    assert f"/reports/junit.xml is {len(PYTEST_REPORT)} bytes, more than the" in str(
        caught.value)
    assert not (tmp_path / "into" / "reports").exists()


def test_a_job_whose_pods_are_gone_is_a_problem_naming_it(kube, provider, tmp_path):
    server, controller = kube
    controller.behave("Job", "train", files={"/reports/junit.xml": PYTEST_REPORT})
    handle, pipeline = run_job(provider)
    [pod] = server.objects("Pod", handle.sandbox_id)
    server.store.delete(TYPES["Pod"], handle.sandbox_id, pod["metadata"]["name"], grace_s=0)

    with pytest.raises(ReportError, match=r"^Job train has no pod left to read its reports "):
        provider.report_files(handle, pipeline, "/reports/*.xml", tmp_path / "into")


def test_a_cluster_older_than_native_sidecars_is_refused_as_config(kube, provider):
    server, _ = kube
    server.version.update(minor="28", gitVersion="v1.28.9")
    handle = create(provider)

    result = provider.run_pipeline(handle, job_pipeline(),
                                   render_context(handle, {}, image=IMAGE, outputs={}), 10)

    assert not result.passed and result.failure_kind is FailureKind.CONFIG
    assert "the cluster runs Kubernetes v1.28.9: a k8s_job's reports need native sidecar" \
        in result.summary
    assert server.objects("Job", handle.sandbox_id) == []


# --- the registry --------------------------------------------------------------------------------

@pytest.mark.parametrize("path, expected", [
    ("reports/junit.xml", "a k8s_job's report is read in its pod: expected an absolute path "
                          "there, such as /reports/junit.xml (got 'reports/junit.xml')"),
    ("${sandbox.workdir}/junit.xml", "expected an absolute path there"),
    ("/junit.xml", "expected the report in a directory of its own"),
    ("/etc/junit.xml", "/etc would be hidden by the volume"),
])
def test_a_k8s_job_report_path_the_pod_cannot_share_is_refused_at_load(tmp_path, path,
                                                                        expected):
    root = write_registry(tmp_path, [config(
        "bad", ui_smoke={}, sandbox={"provider": "kubernetes", "manifests": ["k8s/app.yaml"]},
        pipelines=[{"kind": "k8s_job", "name": "train", "manifest": "k8s/job.yaml",
                    "reports": [{"path": path}]}])])
    (root / "k8s").mkdir()
    (root / "k8s" / "app.yaml").write_text("kind: ConfigMap\n")
    (root / "k8s" / "job.yaml").write_text("kind: Job\n")

    with pytest.raises(RegistryError) as caught:
        load_registry(root)

    field = f"{root / 'configs' / 'bad.yaml'}: pipelines[0].reports[0].path: "
    assert any(p.startswith(field) and expected in p for p in caught.value.problems), \
        caught.value.problems


def test_a_k8s_job_report_defaults_to_the_pinned_busybox():
    assert job_pipeline().report_image == REPORT_IMAGE
    assert REPORT_IMAGE.startswith("busybox:") and REPORT_IMAGE.split(":")[1][0].isdigit()


# --- the pod template, by tables -----------------------------------------------------------------

def job(containers: list[dict], init: list[dict] | None = None,
        volumes: list[dict] | None = None) -> dict:
    spec: dict = {"restartPolicy": "Never", "containers": containers}
    if init is not None:
        spec["initContainers"] = init
    if volumes is not None:
        spec["volumes"] = volumes
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
            "spec": {"template": {"spec": spec}}}


def test_a_volume_a_container_already_mounts_at_the_directory_is_shared_instead():
    body = job([{"name": "a", "image": "x", "volumeMounts": [{"name": "out",
                                                             "mountPath": "/reports/"}]},
                {"name": "b", "image": "x"}], volumes=[{"name": "out", "emptyDir": {}}])

    pod = with_report_sidecar(body, ["/reports/*.xml", "/reports/sub/*.xml"],
                              REPORT_IMAGE)["spec"]["template"]["spec"]

    assert pod["volumes"] == [{"name": "out", "emptyDir": {}}]
    assert [c["volumeMounts"] for c in pod["containers"]] == [
        [{"name": "out", "mountPath": "/reports/"}], [{"name": "out", "mountPath": "/reports"}]]
    assert pod["initContainers"][-1]["volumeMounts"] == [
        {"name": "out", "mountPath": "/reports", "readOnly": True}]
    assert body["spec"]["template"]["spec"].get("initContainers") is None  # not changed


@pytest.mark.parametrize("body, patterns, problem", [
    (job([{"name": SIDECAR, "image": "x"}]), ["/reports/a.xml"], "a container is named"),
    (job([{"name": "a", "image": "x", "volumeMounts": [{"name": "v1", "mountPath": "/r"}]},
          {"name": "b", "image": "x", "volumeMounts": [{"name": "v2", "mountPath": "/r"}]}]),
     ["/r/*.xml"], "its containers mount different volumes at /r (v1, v2)"),
    (job([{"name": "a", "image": "x"}], volumes=[{"name": "mlci-reports-0", "emptyDir": {}}]),
     ["/reports/a.xml"], "a volume is named mlci-reports-0"),
    (job([{"name": "a", "image": "x"}]), ["/*.xml"], "expected an absolute path in the pod"),
])
def test_a_template_that_cannot_take_the_sidecar_says_why(body, patterns, problem):
    with pytest.raises(ManifestError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        with_report_sidecar(body, patterns, REPORT_IMAGE)


# --- the sidecar's log, by tables ---------------------------------------------------------------

def frames(*files: tuple[int, str, bytes], head: bool = True, done: bool = True) -> list[bytes]:
    """A sidecar log holding `files` (pattern index, path, content), as its script prints it."""
    lines = [f"{MARKER} ready 2"] if head else []
    for index, path, content in files:
        lines.append(f"{MARKER} file {index} {len(content)} {path}")
        encoded = base64.encodebytes(content).decode()  # 76 characters a line, as base64 does
        lines += encoded.splitlines()
        lines.append(f"{MARKER} end 0")
    if done:
        lines.append(f"{MARKER} done")
    return [line.encode() for line in lines]


BIG = bytes(range(256)) * 40


def test_a_whole_log_gives_the_files_of_its_pattern_and_no_others(tmp_path):
    log = frames((0, "/r/b.xml", b"<b/>"), (1, "/s/x.xml", b"<x/>"), (0, "/r/a.xml", BIG),
                 (0, "/r/empty.xml", b""))

    written = decode_reports(log, 0, tmp_path, "Job t pod p container c")

    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "r/a.xml", "r/b.xml", "r/empty.xml"]
    assert [p.read_bytes() for p in written] == [BIG, b"<b/>", b""]
    assert not (tmp_path / "s").exists()


def test_at_most_max_files_are_kept(tmp_path):
    log = frames(*[(0, f"/r/{i}.xml", b"<t/>") for i in range(5)])

    assert len(decode_reports(log, 0, tmp_path, "src", max_files=3)) == 3


def with_line(log: list[bytes], at: int, line: bytes | None) -> list[bytes]:
    """The log with the line at `at` replaced by `line` (None: removed)."""
    return [*log[:at], *([line] if line is not None else []), *log[at + 1:]]


@pytest.mark.parametrize("log, error, problem", [
    (with_line(frames((0, "/r/a.xml", BIG)), 2, b"!!!not base64!!!"), ReportError,
     "its frame of /r/a.xml is garbled: '!!!not base64!!!' is not base64"),
    (with_line(frames((0, "/r/a.xml", BIG)), 2, None), ReportError,
     "its frame of /r/a.xml holds 10183 of the 10240 bytes its header says"),
    (with_line(frames((0, "/r/a.xml", b"<a/>")), 3, f"{MARKER} end 1".encode()), ReportError,
     "it could not read /r/a.xml (base64 exited 1)"),
    (with_line(frames((0, "/r/a.xml", b"<a/>")), 3, None), ReportError,
     "its frame of /r/a.xml ends without its end line"),
    ([f"{MARKER} ready 1".encode(), f"{MARKER} too-large 0 999999999999 /r/a.xml".encode(),
      f"{MARKER} done".encode()], ReportError,
     "/r/a.xml is 999999999999 bytes, more than the"),
    (frames((0, "/r/a.xml", b"<a/>"))[:3], IncompleteLog,
     "its log ends inside the frame of /r/a.xml"),
    (frames((0, "/r/a.xml", b"<a/>"), done=False), IncompleteLog,
     "its log ends before its last line"),
    (frames((0, "/r/a.xml", b"<a/>"), head=False), ReportError,
     "its log lacks its first line: its head is gone"),
    ([b"exec /bin/sh: no such file or directory"], IncompleteLog,
     "its log lacks the sidecar's first line (it also printed: exec /bin/sh: no such file"),
    ([], IncompleteLog, "its log is empty"),
    (with_line(frames((0, "/r/a.xml", b"<a/>")), 1, f"{MARKER} file 0 4 r/a.xml".encode()),
     ReportError, "its log holds a line the sidecar never prints"),
    (with_line(frames((0, "/r/a.xml", b"<a/>")), 1, f"{MARKER} file 0 4 /r/../x".encode()),
     ReportError, "a frame names '/r/../x', not a file's absolute path"),
], ids=["garbled", "line-lost", "unreadable", "end-lost", "too-large", "cut", "tail-lost",
        "head-lost", "never-ran", "empty", "relative", "escapes"])
def test_a_log_that_is_not_whole_says_what_is_wrong_with_it(tmp_path, log, error, problem):
    with pytest.raises(error) as caught:
        decode_reports(log, 0, tmp_path / "into", "Job t pod p container c")

    assert str(caught.value).startswith(f"Job t pod p container c: {problem}"), caught.value


def test_a_frame_of_another_pattern_is_skipped_unread(tmp_path):
    log = with_line(frames((1, "/s/x.xml", BIG), (0, "/r/a.xml", b"<a/>")), 2, b"???")

    written = decode_reports(log, 0, tmp_path, "src")

    assert [p.read_bytes() for p in written] == [b"<a/>"]



@pytest.mark.parametrize(("path", "expected"), [
    ("/reports/a.xml", "reports/a.xml"), ("reports/a.xml", "reports/a.xml"),
    ("/reports/../../etc/passwd", None), ("/", None), ("", None),
])
def test_a_fetched_report_is_copied_under_its_own_path_and_never_outside(tmp_path, path,
                                                                         expected):
    """The rule every provider's fetch uses (Kubernetes frames, TPU SFTP copies)."""
    found = report_copy_path(path, tmp_path)

    assert found == (tmp_path / expected if expected else None)
