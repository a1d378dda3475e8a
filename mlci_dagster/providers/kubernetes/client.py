"""One small client over the Kubernetes API: which cluster (kubeconfig, context, in-cluster), the
calls the provider makes, the one retry policy they all go through (`RetryPolicy`: throttling,
server errors, dropped connections, bounded), and errors that say what was asked and why it
failed.

Objects go in and come out as plain camelCase dicts, as on the wire, so `diagnose` reads them
the same whichever API returned them. Any kind is applied through the dynamic client (found by
apiVersion and kind through discovery); namespaces, secrets, pods, events and logs go through the
core API.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import os
import re
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

REQUEST_TIMEOUT_S = 30.0
LOG_LIMIT_BYTES = 8 * 1024 * 1024  # a pod's log read at most this far: memory stays bounded
LOG_CHUNK_BYTES = 64 * 1024  # a log read to its end comes in chunks of this size
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
PROXY_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/services/([^/]+)/proxy(/|$)")


class KubeError(Exception):
    """A Kubernetes API call failed: names the call, the HTTP status (if any) and the reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach one cluster, stored in a handle so any process can reach it again."""

    kubeconfig: str | None = None  # a path (or KUBECONFIG-style list of paths)
    context: str | None = None
    in_cluster: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterAccess:
        return cls(data.get("kubeconfig"), data.get("context"), bool(data.get("in_cluster")))

    def describe(self) -> str:
        if self.in_cluster:
            return "the in-cluster service account"
        return f"kubeconfig {self.kubeconfig}" + (f" context {self.context}"
                                                   if self.context else "")


def resolve_access(kubeconfig: str | None, context: str | None, root: Path | None = None,
                   environ: dict[str, str] | None = None) -> ClusterAccess:
    """The cluster a spec means: its kubeconfig (relative to the registry root), else
    $KUBECONFIG, else ~/.kube/config, else the pod's own service account. The context is pinned
    to the one current now, so a later switch of context never redirects a teardown."""
    env = os.environ if environ is None else environ
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise KubeError(f"kubeconfig {path} does not exist (sandbox.cluster.kubeconfig)")
        chosen = str(path)
    elif env.get("KUBECONFIG"):
        chosen = env["KUBECONFIG"]
    elif (home_config := Path("~/.kube/config").expanduser()).is_file():
        chosen = str(home_config)
    elif env.get(IN_CLUSTER_ENV):
        return ClusterAccess(in_cluster=True)
    else:
        raise KubeError("no cluster configured: set sandbox.cluster.kubeconfig, $KUBECONFIG or "
                        "~/.kube/config, or run in a pod with a service account")
    if context is None:
        try:
            _, active = k8s_config.list_kube_config_contexts(chosen)
        except (ConfigException, OSError, ValueError) as exc:
            raise KubeError(f"kubeconfig {chosen}: {exc}") from exc
        context = (active or {}).get("name")
    return ClusterAccess(chosen, context)


def load_configuration(access: ClusterAccess) -> k8s.Configuration:
    configuration = k8s.Configuration()
    try:
        if access.in_cluster:
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:
            k8s_config.load_kube_config(config_file=access.kubeconfig, context=access.context,
                                        client_configuration=configuration,
                                        persist_config=False)
    except (ConfigException, OSError, ValueError) as exc:
        raise KubeError(f"cannot load {access.describe()}: {exc}") from exc
    return configuration


def api_error_text(exc: k8s.ApiException) -> str:
    """`<status> <reason>: <the Status object's message>` (or the body, when it is no Status:
    a throttled request's is plain text), without the response headers."""
    body = exc.body.decode("utf-8", errors="replace") if isinstance(exc.body, bytes) else str(
        exc.body or "")
    try:
        message = str(json.loads(body or "{}").get("message", ""))
    except (ValueError, AttributeError):
        message = body.strip()[:500]
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _retry_after_s(exc: BaseException) -> float | None:
    """The seconds a refusal asks the client to wait: its Retry-After header (what client-go
    reads), else its Status's details.retryAfterSeconds."""
    headers = getattr(exc, "headers", None) or {}
    for key, value in dict(headers).items():
        if str(key).lower() == "retry-after":
            try:
                return max(0.0, float(int(str(value).strip())))
            except ValueError:
                break  # an HTTP date: not what API servers send
    try:
        seconds = json.loads(getattr(exc, "body", None) or "{}")["details"]["retryAfterSeconds"]
        return max(0.0, float(seconds))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _dropped(exc: BaseException) -> bool:
    """The connection broke under a request already sent (reset, closed before or during the
    answer): the server may or may not have acted on it. Not a refused connection."""
    return isinstance(exc, urllib3.exceptions.ProtocolError | ConnectionResetError
                      | http.client.RemoteDisconnected | http.client.IncompleteRead)


@dataclass(frozen=True)
class RetryPolicy:
    """When an API call is sent again, and for how long: the one place the client decides it.

    As client-go does (k8s.io/client-go rest/with_retry.go IsNextRetry and checkWait; request.go
    retries a reset connection for GETs only): a 429 (API Priority and Fairness throttling, the
    watch cache initialising) and any 5xx carrying Retry-After are sent again after that many
    seconds whatever the verb, since the server says it did not act; a 5xx without it, or a
    connection reset, only when the call is idempotent (a read, a delete: never a create that
    may have happened), after an exponential backoff. Never a refused connection or a timeout:
    the server is down or slow, and the caller's own deadline decides. Each call gives up after
    max_attempts or when the next wait would pass max_elapsed_s since its first attempt. Time is
    sleep and clock, injected so tests do not wait (as dagster-k8s's client takes a sleeper and
    a timer)."""

    max_attempts: int = 10
    max_elapsed_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))

    def wait_before_retry(self, exc: BaseException, attempt: int, idempotent: bool
                          ) -> float | None:
        """The seconds to wait before sending again a call whose attempt number `attempt`
        failed with exc; None when it must not be sent again."""
        if isinstance(exc, k8s.ApiException) and exc.status is not None:
            status = int(exc.status)
            told = _retry_after_s(exc) if status == 429 or status >= 500 else None
            if told is not None:
                return told
            if status == 429 or (status >= 500 and idempotent):
                return self.backoff(attempt)
            return None
        if _dropped(exc) and idempotent:
            return self.backoff(attempt)
        return None


def bearer_authorization(configuration: k8s.Configuration) -> str | None:
    """The `Authorization` value the client itself sends, read through its own auth settings:
    the token sits in `api_key["BearerToken"]` (kubernetes >= 36, from kubeconfigs, exec
    plugins and in-cluster config) or `api_key["authorization"]` (older clients, code that sets
    it by hand), and reading it runs the configuration's `refresh_api_key_hook` (which runs an
    exec plugin again once its token is about to expire, and re-reads a pod's token file)."""
    for setting in configuration.auth_settings().values():
        if setting.get("in") == "header" and str(setting.get("key", "")).lower() == \
                "authorization" and setting.get("value"):
            return str(setting["value"])
    return None


class _KubeAuth(requests.auth.AuthBase):
    """The client's credentials on every request, fetched anew each time (exec plugins and
    service-account tokens refresh)."""

    def __init__(self, configuration: k8s.Configuration) -> None:
        self.configuration = configuration

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = bearer_authorization(self.configuration)
        if token:
            request.headers["Authorization"] = token
        elif self.configuration.username or self.configuration.password:
            request.headers["Authorization"] = self.configuration.get_basic_auth_token()
        return request


class KubeClient:
    """The calls the provider makes against one cluster, each sent again as `retry` says and
    wrapped so a failure is a KubeError that names the call."""

    def __init__(self, access: ClusterAccess, cache_dir: Path | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 retry: RetryPolicy | None = None,
                 log_limit_bytes: int = LOG_LIMIT_BYTES) -> None:
        self.access = access
        self.configuration = load_configuration(access)
        # urllib3 would otherwise retry by itself (three times: a 429 or 503 with Retry-After,
        # sleeping as told, and dropped connections): the retry policy is this client's alone.
        self.configuration.retries = False
        self.retry = retry or RetryPolicy()
        self.log_limit_bytes = log_limit_bytes
        self.api = k8s.ApiClient(self.configuration)
        self.core = k8s.CoreV1Api(self.api)
        self.timeout = request_timeout_s
        self._cache_dir = cache_dir
        self._dynamic: DynamicClient | None = None

    @property
    def server(self) -> str:
        """The API server's base URL, without a trailing slash."""
        return self.configuration.host.rstrip("/")

    def close(self) -> None:
        self.api.close()

    # --- calls ---------------------------------------------------------------------------

    def _call(self, what: str, call: Callable[[], Any], *, idempotent: bool = True) -> Any:
        """call(), sent again while the retry policy says so (idempotent: whether sending it
        twice is harmless, as reads and deletes are and creates are not); a failure is a
        KubeError naming `what`, the status and, after retries, how long it kept trying."""
        policy = self.retry
        start, attempt = policy.clock(), 0
        while True:
            attempt += 1
            try:
                return call()
            except Exception as exc:
                error = self._error(what, exc)
                if error is None:
                    raise
                wait = policy.wait_before_retry(exc, attempt, idempotent)
                if wait is None:
                    raise error from exc
                elapsed = policy.clock() - start
                if attempt >= policy.max_attempts or elapsed + wait > policy.max_elapsed_s:
                    beyond = (f"; it asked to wait {wait:g}s more, past the "
                              f"{policy.max_elapsed_s:g}s a call may take"
                              if elapsed + wait > policy.max_elapsed_s else "")
                    raise KubeError(f"{what}: gave up after {attempt} attempts in "
                                    f"{elapsed:.1f}s: {self._reason(exc)}{beyond}",
                                    error.status) from exc
                policy.sleep(wait)

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, k8s.ApiException):
            return f"the API server {self.server} answered {api_error_text(exc)}"
        return f"the API server {self.server} dropped the connection: {exc}"

    def _error(self, what: str, exc: BaseException) -> KubeError | None:
        """The KubeError exc means, or None for an exception no API call raises."""
        if isinstance(exc, k8s.ApiException):
            return KubeError(f"{what}: {api_error_text(exc)}", exc.status)
        if isinstance(exc, ResourceNotFoundError):
            return KubeError(f"{what}: the cluster does not serve this kind ({exc}); is its "
                             "CustomResourceDefinition installed?")
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError | http.client.HTTPException):
            return KubeError(f"{what}: cannot reach the API server {self.server}: {exc}")
        return None

    def _json(self, what: str, call: Callable[..., Any], *args: Any,
              idempotent: bool = True, **kwargs: Any) -> Any:
        """A core API call whose response is read as the JSON the server sent (read inside
        the call: a connection dropped while the body comes is retried like any other)."""
        data = self._call(what, lambda: call(*args, _preload_content=False,
                                             _request_timeout=self.timeout, **kwargs).data,
                          idempotent=idempotent)
        try:
            return json.loads(data or b"null")
        except ValueError as exc:
            raise KubeError(f"{what}: the API server answered with no JSON: {exc}") from exc

    @property
    def dynamic(self) -> DynamicClient:
        if self._dynamic is None:
            cache_file = None
            if self._cache_dir is not None:
                self._cache_dir.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256(self.server.encode()).hexdigest()[:16]
                cache_file = str(self._cache_dir / f"discovery-{digest}.json")
            self._dynamic = self._call("discover the API server's kinds",
                                       lambda: DynamicClient(self.api, cache_file=cache_file))
        return self._dynamic

    def resource(self, api_version: str, kind: str) -> Any:
        what = f"find kind {kind} in {api_version}"
        return self._call(what, lambda: self.dynamic.resources.get(api_version=api_version,
                                                                   kind=kind))

    # --- any kind ------------------------------------------------------------------------

    def create(self, obj: dict[str, Any], namespace: str) -> tuple[dict[str, Any], bool]:
        """Creates `obj` (in `namespace` if its kind is namespaced, whatever it says); returns
        the created object and whether it is namespaced."""
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not api_version or not kind:
            raise KubeError("a manifest document lacks apiVersion or kind")
        resource = self.resource(api_version, kind)
        body = copy.deepcopy(obj)
        metadata = body.setdefault("metadata", {})
        if resource.namespaced:
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        name = metadata.get("name") or f"{metadata.get('generateName', '')}*"
        created = self._call(
            f"create {kind} {name}" + (f" in namespace {namespace}" if resource.namespaced
                                       else " (cluster-scoped)"),
            lambda: self.dynamic.create(resource, body=body,
                                        namespace=namespace if resource.namespaced else None,
                                        _request_timeout=self.timeout), idempotent=False)
        return created.to_dict(), bool(resource.namespaced)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None
            ) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        resource = self.resource(api_version, kind)
        where = namespace if resource.namespaced else None
        try:
            found = self._call(f"read {kind} {name}",
                               lambda: self.dynamic.get(resource, name=name, namespace=where,
                                                        _request_timeout=self.timeout))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return found.to_dict()

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None,
               propagation: str = "Background") -> bool:
        """Deletes the object and, by `propagation`, what it owns; False if it was gone."""
        resource = self.resource(api_version, kind)
        where = namespace if resource.namespaced else None
        try:
            self._call(f"delete {kind} {name}",
                       lambda: self.dynamic.delete(resource, name=name, namespace=where,
                                                   propagation_policy=propagation,
                                                   _request_timeout=self.timeout))
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- namespaces ----------------------------------------------------------------------

    def create_namespace(self, name: str, labels: dict[str, str],
                         annotations: dict[str, str]) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels, "annotations": annotations}}
        return self._json(f"create namespace {name}", self.core.create_namespace, body,
                          idempotent=False)

    def annotate_namespace(self, name: str, annotations: dict[str, str]) -> None:
        # The client would label a dict body a JSON patch (a list of operations): say it is not.
        self._json(f"annotate namespace {name}", self.core.patch_namespace, name,
                   {"metadata": {"annotations": annotations}}, idempotent=False,
                   _content_type="application/merge-patch+json")

    def read_namespace(self, name: str) -> dict[str, Any] | None:
        try:
            return self._json(f"read namespace {name}", self.core.read_namespace, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def delete_namespace(self, name: str) -> bool:
        """Deletes the namespace, its content before it (Foreground); False if it was gone.
        A namespace already terminating answers 409 Conflict: its deletion is under way."""
        try:
            self._json(f"delete namespace {name}", self.core.delete_namespace, name,
                       body={"propagationPolicy": "Foreground"})
        except KubeError as exc:
            if exc.status == 404:
                return False
            if exc.status == 409:
                return True
            raise
        return True

    def list_namespaces(self, label_selector: str) -> list[dict[str, Any]]:
        found = self._json(f"list namespaces labelled {label_selector}",
                           self.core.list_namespace, label_selector=label_selector)
        return list(found.get("items") or [])

    # --- secrets, pods, events, logs -----------------------------------------------------

    def create_secret(self, namespace: str, name: str, string_data: dict[str, str],
                      labels: dict[str, str]) -> None:
        """The response (which holds the values) is dropped unread."""
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "labels": labels}, "stringData": string_data}
        self._call(f"create secret {name} in namespace {namespace}",
                   lambda: self.core.create_namespaced_secret(
                       namespace, body, _preload_content=False, _request_timeout=self.timeout),
                   idempotent=False)

    def pods(self, namespace: str, label_selector: str | None = None,
             name: str | None = None) -> list[dict[str, Any]]:
        field_selector = f"metadata.name={name}" if name else None
        found = self._json(
            f"list pods in namespace {namespace}" + (f" ({label_selector})"
                                                     if label_selector else ""),
            self.core.list_namespaced_pod, namespace, label_selector=label_selector,
            field_selector=field_selector)
        return list(found.get("items") or [])

    def container_logs(self, namespace: str, selector: str | None,
                       skip: Collection[str] = ()) -> list[tuple[str, str, str]]:
        """(pod, container, log) of every container of the pods matching `selector` (all pods
        if None) but those named in `skip`, oldest pod first; a log that cannot be read says why
        in its place."""
        pods = sorted(self.pods(namespace, selector),
                      key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        logs = []
        for pod in pods:
            pod_name = (pod.get("metadata") or {}).get("name", "?")
            spec = pod.get("spec") or {}
            for container in [*(spec.get("initContainers") or []),
                              *(spec.get("containers") or [])]:
                if container.get("name") in skip:
                    continue
                try:
                    text = self.pod_log(namespace, pod_name, container.get("name"))
                except KubeError as exc:
                    text = f"(log unavailable: {exc})\n"
                logs.append((pod_name, container.get("name", "?"), text))
        return logs

    def events(self, namespace: str) -> list[dict[str, Any]]:
        found = self._json(f"list events in namespace {namespace}",
                           self.core.list_namespaced_event, namespace)
        return list(found.get("items") or [])

    def pod_log(self, namespace: str, pod: str, container: str | None = None,
                previous: bool = False) -> str:
        """The container's log (its previous run's, if asked), or, when it is longer than
        log_limit_bytes, as many of its last lines as fit, after a line that says so: the end
        is where a run's verdict is. The kubelet cuts the head of what it selects (tailLines
        first, then limitBytes: pkg/kubelet/kuberuntime/logs/logs.go), so a long log is asked
        again for fewer last lines until they fit."""
        what = f"read the log of pod {pod}" + (f" container {container}" if container else "")
        limit = self.log_limit_bytes

        def read(tail_lines: int | None = None) -> bytes:
            # one byte past the limit tells a log cut at the limit from one that fits in it
            return self._call(what, lambda: self.core.read_namespaced_pod_log(
                pod, namespace, container=container, previous=previous, tail_lines=tail_lines,
                limit_bytes=limit + 1, _preload_content=False,
                _request_timeout=self.timeout).data) or b""

        data = read()
        if len(data) <= limit:
            return data.decode("utf-8", errors="replace")
        lines = max(1, data.count(b"\n"))  # about as many last lines as first lines fitted
        while len(data := read(lines)) > limit and lines > 1:
            lines //= 2
        kept = data[:limit].decode("utf-8", errors="replace")
        return (f"(mlci: this log is longer than {limit} bytes; only its last "
                f"{kept.count(chr(10))} lines are kept)\n{kept}")

    def pod_log_lines(self, namespace: str, pod: str, container: str) -> Iterator[bytes]:
        """The container's whole log, line by line (without the newlines) as it streams in:
        for a log read to its end in bounded memory. Only the request is sent again as the
        retry policy says; a connection that breaks while the log comes is a KubeError."""
        what = f"read the log of pod {pod} container {container}"
        response = self._call(what, lambda: self.core.read_namespaced_pod_log(
            pod, namespace, container=container, _preload_content=False,
            _request_timeout=self.timeout))
        pending = b""
        try:
            for chunk in response.stream(LOG_CHUNK_BYTES):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                yield from lines
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"{what}: the connection broke while the log came: {exc}") from exc
        finally:
            response.release_conn()
        if pending:
            yield pending

    def server_version(self) -> tuple[int, int, str] | None:
        """The API server's (major, minor, gitVersion), from its gitVersion (`v1.31.2-eks-…`);
        None when that does not say."""
        found = self._json("read the API server's version",
                           k8s.VersionApi(self.api).get_code)
        text = str((found or {}).get("gitVersion", ""))
        match = re.match(r"v?(\d+)\.(\d+)", text)
        return (int(match[1]), int(match[2]), text) if match else None

    # --- HTTP to services ----------------------------------------------------------------

    def session(self) -> requests.Session:
        """A requests session with this client's credentials and TLS settings: it reaches the
        API server's service proxy as the client does."""
        return session_for(self.configuration)


class ServiceProxyRefusal(requests.HTTPError):
    """The API server's service proxy answered for the service: it could not reach it (no ready
    pod backs the port, no such port or Service), so the service itself said nothing."""


PROXY_HINTS = {
    "no endpoints available": "no ready pod backs this port of the Service: its pods are not "
                              "ready (yet, or any more), or its selector or port matches none",
    "no service port": "the Service declares no such port",
    "error trying to reach service": "a pod is ready but nothing answered on its port",
}


def explain_proxy_refusal(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """A response hook: an answer of the service proxy itself (a `kind: Status` failure on a
    proxy path: 503 ServiceUnavailable, 404 NotFound) raises ServiceProxyRefusal naming the
    service and why, rather than passing for the service's own 503 or 404."""
    match = PROXY_PATH.search(unquote(urlsplit(response.url).path))
    if match is None or response.status_code not in (404, 503) or not response.headers.get(
            "Content-Type", "").startswith("application/json"):
        return
    try:
        body = response.json()
    except ValueError:
        return
    if not (isinstance(body, dict) and body.get("kind") == "Status"
            and body.get("status") == "Failure"):
        return
    message = str(body.get("message", ""))
    hint = next((h for start, h in PROXY_HINTS.items() if message.startswith(start)), "")
    raise ServiceProxyRefusal(
        f"the API server's service proxy answered {response.status_code} "
        f"{body.get('reason', '')} for service {match[2]} in namespace {match[1]}: {message}"
        + (f" ({hint})" if hint else ""), response=response)


def session_for(configuration: k8s.Configuration) -> requests.Session:
    """A requests session that sends what the client sends: its credentials (asked for anew on
    each request), its TLS settings and its proxy, and nothing of the environment's besides
    (requests would let REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override the cluster's own CA, and
    read .netrc). A refusal of the service proxy itself raises ServiceProxyRefusal (a
    requests.RequestException)."""
    session = requests.Session()
    session.trust_env = False
    session.hooks["response"].append(explain_proxy_refusal)
    session.auth = _KubeAuth(configuration)
    if configuration.cert_file:
        session.cert = ((configuration.cert_file, configuration.key_file)
                        if configuration.key_file else configuration.cert_file)
    if not configuration.verify_ssl:
        session.verify = False
    elif configuration.ssl_ca_cert:
        session.verify = configuration.ssl_ca_cert
    # The client takes its proxy from the kubeconfig or HTTP(S)_PROXY, and NO_PROXY exempts
    # the API server from it (kubernetes/client/rest.py).
    if configuration.proxy and not requests.utils.should_bypass_proxies(
            configuration.host, no_proxy=configuration.no_proxy or ""):
        session.proxies = {"http": configuration.proxy, "https": configuration.proxy}
    return session
