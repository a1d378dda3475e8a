"""A small client of the Cloud TPU v2 API (`google-cloud-tpu`, REST transport): nodes created,
read, listed and deleted, long-running operations waited for by name, every error naming the
call it came from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2

CALL_TIMEOUT_S = 30.0


class TpuApiError(Exception):
    """A Cloud TPU API call failed; the message names the call and the object."""


@dataclass(frozen=True)
class NodeInfo:
    """What the provider reads of a node."""

    name: str  # projects/{p}/locations/{z}/nodes/{id}
    state: str  # READY, CREATING, PREEMPTED, ...
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    internal_ip: str = ""
    external_ip: str = ""
    accelerator_type: str = ""
    health_description: str = ""

    @classmethod
    def of(cls, node: tpu_v2.Node) -> NodeInfo:
        endpoints = list(node.network_endpoints)
        first = endpoints[0] if endpoints else None
        return cls(name=node.name, state=tpu_v2.Node.State(node.state).name,
                   labels=dict(node.labels), metadata=dict(node.metadata),
                   internal_ip=first.ip_address if first else "",
                   external_ip=first.access_config.external_ip if first else "",
                   accelerator_type=node.accelerator_type,
                   health_description=node.health_description)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "labels": self.labels,
                "internal_ip": self.internal_ip, "external_ip": self.external_ip,
                "accelerator_type": self.accelerator_type,
                "health_description": self.health_description}


def parent_of(project: str, zone: str) -> str:
    return f"projects/{project}/locations/{zone}"


class TpuClient:
    """One endpoint's TPU API. An `http://` endpoint (a loopback emulator) is reached without
    credentials; otherwise Application Default Credentials, as every Google client does."""

    def __init__(self, api_endpoint: str | None = None, poll_interval_s: float = 2.0) -> None:
        self.api_endpoint = api_endpoint
        self.poll_interval_s = poll_interval_s
        options: dict[str, Any] = {}
        credentials = None
        if api_endpoint:
            options["api_endpoint"] = api_endpoint.rstrip("/")
            if api_endpoint.startswith("http://"):
                credentials = AnonymousCredentials()  # plain HTTP carries no tokens
        try:
            self._api = tpu_v2.TpuClient(transport="rest", client_options=options or None,
                                         credentials=credentials)
        except google_exceptions.GoogleAPIError as exc:  # DefaultCredentialsError among them
            raise TpuApiError(f"tpu client for {api_endpoint or 'tpu.googleapis.com'}: "
                              f"{exc}") from exc

    def _call(self, what: str, step: Any) -> Any:
        try:
            return step()
        except google_exceptions.GoogleAPIError as exc:
            raise TpuApiError(f"tpu {what}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a transport error (refused, reset) names the call
            raise TpuApiError(f"tpu {what}: {type(exc).__name__}: {exc}") from exc

    def create_node(self, parent: str, node_id: str, node: dict[str, Any]) -> str:
        """Starts creating `node` as `<parent>/nodes/<node_id>`; returns its operation's name."""
        operation = self._call(f"create_node {parent}/nodes/{node_id}", lambda: (
            self._api.create_node(request={"parent": parent, "node_id": node_id,
                                           "node": tpu_v2.Node(node)},
                                  timeout=CALL_TIMEOUT_S)))
        return operation.operation.name

    def get_node(self, name: str, timeout_s: float = CALL_TIMEOUT_S) -> NodeInfo | None:
        """The node, or None when the API says NOT_FOUND."""
        try:
            node = self._call(f"get_node {name}",
                              lambda: self._api.get_node(name=name, timeout=timeout_s))
        except TpuApiError as exc:
            if isinstance(exc.__cause__, google_exceptions.NotFound):
                return None
            raise
        return NodeInfo.of(node)

    def list_nodes(self, parent: str, timeout_s: float = CALL_TIMEOUT_S) -> list[NodeInfo]:
        """Every node in the zone (the v2 API has no server-side filter: callers filter)."""
        return self._call(f"list_nodes {parent}", lambda: [
            NodeInfo.of(n) for n in self._api.list_nodes(parent=parent, timeout=timeout_s)])

    def delete_node(self, name: str) -> str | None:
        """Starts deleting the node; its operation's name, or None when it is already gone."""
        try:
            operation = self._call(f"delete_node {name}", lambda: self._api.delete_node(
                name=name, timeout=CALL_TIMEOUT_S))
        except TpuApiError as exc:
            if isinstance(exc.__cause__, google_exceptions.NotFound):
                return None
            raise
        return operation.operation.name

    def wait_operation(self, name: str, deadline: float, what: str) -> None:
        """Polls the operation until it is done (returns) or failed (raises, with its error);
        raises TimeoutError at `deadline` (time.monotonic())."""
        while True:
            remaining = deadline - time.monotonic()
            call_timeout = max(1.0, min(CALL_TIMEOUT_S, remaining))
            operation = self._call(f"get_operation {name} ({what})", lambda t=call_timeout: (
                self._api.get_operation(request={"name": name}, timeout=t)))
            if operation.done:
                if operation.HasField("error"):
                    raise TpuApiError(f"tpu {what}: operation {name} failed: "
                                      f"code {operation.error.code}: {operation.error.message}")
                return
            if remaining <= 0:
                raise TimeoutError(f"tpu {what}: operation {name} not done at the deadline")
            time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
