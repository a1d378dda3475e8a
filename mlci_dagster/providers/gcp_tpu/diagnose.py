"""What a TPU node's state means to a lifecycle, as pure functions: ready, still coming, or gone
for good and whose fault that is. Tested by a table."""

from __future__ import annotations

from dataclasses import dataclass

# States a node passes through on its way to READY (or back to it, after a repair).
TRANSIENT = frozenset({"CREATING", "STARTING", "RESTARTING", "REIMAGING", "REPAIRING",
                       "UNHIDING", "STATE_UNSPECIFIED", "UNKNOWN"})
# States from which a node will not serve this run: reclaimed, stopped, going away.
LOST = {
    "PREEMPTED": "preempted: Google Cloud reclaimed the spot or preemptible VM",
    "TERMINATED": "terminated by Google Cloud",
    "STOPPED": "stopped",
    "STOPPING": "stopping",
    "DELETING": "being deleted",
    "HIDING": "being hidden",
    "HIDDEN": "hidden",
}


@dataclass(frozen=True)
class NodeVerdict:
    ready: bool
    terminal: bool  # waiting longer will not help
    why: str


def readiness(node: str, state: str, health: str = "") -> NodeVerdict:
    """Whether a node in `state` is ready, may still become so, or never will in this run."""
    detail = f" ({health})" if health else ""
    if state == "READY":
        return NodeVerdict(True, False, f"node {node} is READY")
    if state in LOST:
        return NodeVerdict(False, True, f"node {node} is {state}: {LOST[state]}{detail}")
    if state in TRANSIENT:
        return NodeVerdict(False, False, f"node {node} is still {state}{detail}")
    return NodeVerdict(False, True, f"node {node} is in an unexpected state {state}{detail}")


def interruption(node: str, state: str | None) -> str:
    """Why a pipeline running on `node` must stop ("" while the node is READY). Whatever takes
    a node away mid-run is the infrastructure's doing, never the product's."""
    if state is None:
        return f"node {node} no longer exists (deleted while the pipeline ran)"
    if state == "READY" or state in TRANSIENT - {"CREATING"}:
        return ""  # a repair or restart may bring it back; the SSH connection decides
    verdict = readiness(node, state)
    return f"{verdict.why}; the pipeline was cut short (an infrastructure failure)"

