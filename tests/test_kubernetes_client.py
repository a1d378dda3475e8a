"""The Kubernetes client's retry policy and log reading: the policy's rules by tables (pure, on
exceptions as the official client raises them), the one `_call` loop every API call goes
through on a clock the tests move, and both against the loopback API emulator
(tests/support/kube_wire.py) with faults injected as a real server answers them.

The rules are client-go's (k8s.io/client-go rest/with_retry.go IsNextRetry, checkWait;
request.go: a reset connection is retried for GETs only): 429 and any 5xx with Retry-After after
that many seconds, whatever the verb; a 5xx without it, and a dropped connection, only when the
call is idempotent."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client as k8s

from mlci_dagster.providers.kubernetes import client as kube_client
from mlci_dagster.providers.kubernetes.client import (
    ClusterAccess,
    KubeClient,
    KubeError,
    RetryPolicy,
)
from tests.support.kube_controller import TRACEBACK, KubeController
from tests.support.kube_store import TYPES, ManualClock, wait_until
from tests.support.kube_wire import KubeApiServer


def refusal(status: int, retry_after: str | None = None, body: Any = None) -> k8s.ApiException:
    """An ApiException as the client raises it for an answer of `status`."""
    exc = k8s.ApiException(status=status, reason=http.client.responses[status])
    exc.headers = urllib3.HTTPHeaderDict({"Retry-After": retry_after} if retry_after else {})
    exc.body = json.dumps(body).encode() if body is not None else b""
    return exc


RESET = urllib3.exceptions.ProtocolError(
    "Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
REFUSED = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
POLICY = RetryPolicy()


@pytest.mark.parametrize("exc, idempotent, wait", [
    (refusal(429, "1"), False, 1.0),  # throttled: never acted on, any verb
    (refusal(429, "7"), True, 7.0),
    (refusal(429, body={"details": {"retryAfterSeconds": 2}}), False, 2.0),
    (refusal(429), False, 0.5),  # no Retry-After at all: the backoff
    (refusal(503, "3"), False, 3.0),  # the server says when: any verb (client-go's checkWait)
    (refusal(500), True, 0.5),
    (refusal(503), True, 0.5),
    (refusal(504), True, 0.5),
    (refusal(500), False, None),  # a create that may have happened is not sent twice
    (refusal(504), False, None),
    (refusal(404), True, None),
    (refusal(409), False, None),
    (refusal(403), True, None),
    (RESET, True, 0.5),
    (RESET, False, None),
    (http.client.RemoteDisconnected("closed"), True, 0.5),
    (REFUSED, True, None),  # the server is down: the caller's deadline decides
    (urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"), True, None),
])
def test_what_is_sent_again_and_after_how_long(exc, idempotent, wait):
    assert POLICY.wait_before_retry(exc, 1, idempotent) == wait


def test_the_backoff_doubles_up_to_its_cap():
    assert [POLICY.backoff(attempt) for attempt in range(1, 8)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeApiServer, Path, KubeController]]:
    with KubeApiServer() as server, KubeController(server, interval_s=0.02) as controller:
        yield server, server.kubeconfig(tmp_path / "kubeconfig.json"), controller
        assert controller.errors == []


def pod_done(server: KubeApiServer, name: str, phase: str = "Succeeded") -> None:
    wait_until(lambda: server.store.get(TYPES["Pod"], "default", name)["status"].get(
        "phase") == phase, what=f"{name} {phase}")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def client_of(kubeconfig: Path, clock: ManualClock, **policy: Any) -> KubeClient:
    return KubeClient(ClusterAccess(str(kubeconfig)), retry=RetryPolicy(
        sleep=clock.sleep, clock=clock.monotonic, **policy))


def failing(*errors: BaseException, then: Any = "done") -> Any:
    """A call that raises each of errors in turn, then returns `then`; .calls counts them."""
    pending = list(errors)

    def call() -> Any:
        call.calls += 1  # type: ignore[attr-defined]
        if pending:
            raise pending.pop(0)
        return then
    call.calls = 0  # type: ignore[attr-defined]
    return call


def test_call_waits_as_told_and_returns_what_the_call_finally_returns(cluster, clock):
    client = client_of(cluster[1], clock)
    call = failing(refusal(429, "1"), refusal(429, "2"), refusal(503), RESET)

    assert client._call("read namespace x", call) == "done"
    assert call.calls == 5
    assert clock.slept == [1.0, 2.0, 2.0, 4.0]  # Retry-After, then the backoff of attempts 3, 4


def test_call_gives_up_after_its_attempts_naming_the_call_and_the_answer(cluster, clock):
    client = client_of(cluster[1], clock, max_attempts=4)
    call = failing(*[refusal(429, "1", {"message": "storage is (re)initializing"})] * 10)

    with pytest.raises(KubeError) as gave_up:
        client._call("list pods in namespace x", call)

    assert str(gave_up.value) == (
        "list pods in namespace x: gave up after 4 attempts in 3.0s: the API server "
        f"{client.server} answered 429 Too Many Requests: storage is (re)initializing")
    assert gave_up.value.status == 429 and call.calls == 4


def test_call_gives_up_before_a_wait_that_would_pass_its_time(cluster, clock):
    client = client_of(cluster[1], clock, max_elapsed_s=30)
    call = failing(refusal(429, "20"), refusal(429, "20"))

    with pytest.raises(KubeError) as gave_up:
        client._call("delete namespace x", call)

    assert str(gave_up.value).endswith("; it asked to wait 20s more, past the 30s a call may "
                                       "take")
    assert clock.slept == [20.0] and call.calls == 2


@pytest.mark.parametrize("exc, says", [
    (refusal(500, body={"message": "Internal error occurred: etcdserver: leader changed"}),
     "create namespace x: 500 Internal Server Error: Internal error occurred: etcdserver: "
     "leader changed"),
    (RESET, "create namespace x: cannot reach the API server"),
])
def test_a_write_is_not_sent_twice_after_an_answer_it_may_have_acted_on(cluster, clock, exc,
                                                                       says):
    client = client_of(cluster[1], clock)
    call = failing(exc)

    with pytest.raises(KubeError) as failed:
        client._call("create namespace x", call, idempotent=False)

    assert str(failed.value).startswith(says) and call.calls == 1 and clock.slept == []


def test_other_exceptions_pass_through_unretried(cluster, clock):
    call = failing(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        client_of(cluster[1], clock)._call("read namespace x", call)
    assert call.calls == 1


# --- against the emulator

def test_the_official_clients_own_retries_are_off(cluster, clock):
    """urllib3's default Retry would resend a 429 or 503 carrying Retry-After three times,
    sleeping as told, unseen: the client's policy is the only one."""
    server, kubeconfig, _ = cluster
    throttled = server.inject(429, retry_after=1, count=None)
    client = client_of(kubeconfig, clock, max_attempts=2)

    with pytest.raises(KubeError, match="gave up after 2 attempts"):
        client.list_namespaces("app=x")

    assert throttled.answered == 2 and clock.slept == [1.0]


def test_writes_are_retried_on_throttling_not_on_errors_they_may_have_acted_on(cluster, clock):
    server, kubeconfig, _ = cluster
    client = client_of(kubeconfig, clock)
    server.inject(429, plain=True, count=2, methods=("POST",))
    client.create_namespace("throttled", {}, {})
    server.inject(503, retry_after=2, methods=("POST",))
    client.create_namespace("told-when", {}, {})
    server.inject(500, methods=("POST",))

    with pytest.raises(KubeError) as failed:
        client.create_namespace("failed", {}, {})

    assert {"throttled", "told-when"} <= set(server.namespaces())
    assert "failed" not in server.namespaces()
    assert failed.value.status == 500 and "create namespace failed: 500" in str(failed.value)
    assert clock.slept == [1.0, 1.0, 2.0]
    assert [p for m, p in server.requests if m == "POST"] == ["/api/v1/namespaces"] * 6


def test_reads_are_retried_on_errors_and_dropped_connections(cluster, clock):
    server, kubeconfig, _ = cluster
    client = client_of(kubeconfig, clock)
    for fault in ({"status": 503}, {"status": 500}, {"reset": True}, {"status": 504}):
        server.inject(**fault, methods=("GET",))

    assert client.read_namespace("default")["metadata"]["name"] == "default"
    assert clock.slept == [0.5, 1.0, 2.0, 4.0]


def test_discovery_and_the_dynamic_client_are_retried_too(cluster, clock):
    server, kubeconfig, _ = cluster
    client = client_of(kubeconfig, clock)
    server.inject(429, plain=True, count=3, methods=("GET",), path_regex=r"^/(version|api)")

    assert client.get("apps/v1", "Deployment", "nothing", "default") is None
    assert clock.slept == [1.0, 1.0, 1.0]


@pytest.fixture
def long_log(cluster: tuple[KubeApiServer, Path, KubeController]) -> str:
    """A finished pod `chatty` whose log is 100 lines of 10 bytes (newline included), the
    last one `result=42`."""
    server, _, controller = cluster
    lines = [f"line {i:04d}" for i in range(99)] + ["result=42"]
    controller.behave("Pod", "chatty", log="\n".join(lines))
    server.store.create(TYPES["Pod"], "default", {"metadata": {"name": "chatty"}, "spec": {
        "restartPolicy": "Never", "containers": [{"name": "main", "image": "c:1"}]}})
    pod_done(server, "chatty")
    return "\n".join(lines) + "\n"


def test_a_log_longer_than_the_limit_is_read_from_its_end(cluster, clock, long_log):
    """The kubelet returns the head of what it selects (tailLines first, then limitBytes):
    a client that only sends limit_bytes keeps a long log's beginning and loses its verdict."""
    server, kubeconfig, _ = cluster
    client = KubeClient(ClusterAccess(str(kubeconfig)), log_limit_bytes=256)

    text = client.pod_log("default", "chatty", "main")

    note, kept = text.split("\n", 1)
    assert note == "(mlci: this log is longer than 256 bytes; only its last 25 lines are kept)"
    assert long_log.endswith(kept) and kept.endswith("result=42\n") and len(kept) <= 256
    reads = [p for m, p in server.requests if p.endswith("/pods/chatty/log")]
    assert len(reads) == 2  # the head, then the last lines that fit
    assert KubeClient(ClusterAccess(str(kubeconfig))).pod_log(
        "default", "chatty", "main") == long_log  # under the default limit: all of it


def test_the_previous_log_of_a_crashed_container_is_its_last_run(cluster, clock):
    server, kubeconfig, controller = cluster
    controller.behave("Pod", "flaky", failure="crash-loop")
    for name in ("flaky", "steady"):
        server.store.create(TYPES["Pod"], "default", {"metadata": {"name": name}, "spec": {
            "containers": [{"name": "main", "image": "f:1"}]}})
    wait_until(lambda: "CrashLoopBackOff" in json.dumps(server.store.get(
        TYPES["Pod"], "default", "flaky")["status"]), what="a crash loop")
    pod_done(server, "steady", "Running")
    client = client_of(kubeconfig, clock)

    assert client.pod_log("default", "flaky", "main", previous=True) == f"{TRACEBACK}\n"
    with pytest.raises(KubeError) as none:
        client.pod_log("default", "steady", "main", previous=True)
    assert none.value.status == 400 and str(none.value) == (
        "read the log of pod steady container main: 400 Bad Request: previous terminated "
        'container "main" in pod "steady" not found')


def test_a_log_read_to_its_end_comes_line_by_line_whole_past_any_limit(cluster, clock, long_log,
                                                                       monkeypatch):
    """What the report sidecar's log is read with: every line, however long the log (past
    log_limit_bytes, its lines across chunks), the request retried as any read is."""
    server, kubeconfig, _ = cluster
    monkeypatch.setattr(kube_client, "LOG_CHUNK_BYTES", 7)
    client = KubeClient(ClusterAccess(str(kubeconfig)), log_limit_bytes=256, retry=RetryPolicy(
        sleep=clock.sleep, clock=clock.monotonic))
    throttled = server.inject(429, retry_after=1, path_regex="/pods/chatty/log$")

    lines = list(client.pod_log_lines("default", "chatty", "main"))

    assert b"\n".join(lines).decode() + "\n" == long_log
    assert throttled.answered == 1
    with pytest.raises(KubeError, match="read the log of pod missing container main: 404"):
        list(client.pod_log_lines("default", "missing", "main"))


def test_the_server_version_is_read_from_its_git_version(cluster, clock):
    server, kubeconfig, _ = cluster
    client = client_of(kubeconfig, clock)

    assert client.server_version() == (1, 31, "v1.31.0+mlci-emulator")
    server.version.update(gitVersion="v1.29.4-eks-036c24b")
    assert client.server_version() == (1, 29, "v1.29.4-eks-036c24b")
    server.version.update(gitVersion="unknown")
    assert client.server_version() is None
