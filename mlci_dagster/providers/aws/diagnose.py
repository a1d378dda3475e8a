"""Pure functions over what SageMaker answers: resource names, whether an endpoint is ready or
failed and whose fault that is, handles rebuilt from tags, and the verdict on an invocation."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from mlci_dagster.common.dotted import MISSING, dig
from mlci_dagster.vocabulary import FailureKind

NAME_PREFIX = "mlci-"
MAX_NAME = 63  # SageMaker's limit for model, endpoint config and endpoint names
RUN_TAG = "mlci:run-id"
PARTITION_TAG = "mlci:partition"
EXPIRES_TAG = "mlci:expires-at"
# An endpoint in one of these will not become InService without someone acting.
FAILED_STATES = {"Failed", "OutOfService", "Deleting"}
# Words of a FailureReason that blame the account or the region, not the container.
INFRA_REASONS = re.compile(
    r"capacity|limit|quota|throttl|access ?denied|not authorized|permission|assume|role|"
    r"insufficient|service ?unavailable|internal ?(server )?error", re.IGNORECASE)


def resource_name(config: str, engine: str, suffix: str) -> str:
    """`mlci-<config>-<engine>-<suffix>`, at most 63 of [a-zA-Z0-9-] with no double hyphen
    at either end: the config part is cut first. Model, endpoint config and endpoint share it,
    and it is the sandbox id."""
    engine = re.sub(r"[^a-z0-9-]", "-", engine.lower())[:20].strip("-")
    room = MAX_NAME - len(NAME_PREFIX) - len(suffix) - len(engine) - 2
    config = re.sub(r"[^a-z0-9-]", "-", config.lower())[:max(room, 0)].strip("-")
    return NAME_PREFIX + "-".join(part for part in (config, engine, suffix) if part)


def tag_value(text: str) -> str:
    """`text` as a tag value: at most 256 of the characters AWS allows."""
    value = re.sub(r"[^\w.:/=+@ -]", "-", text)
    if len(value) > 256:
        value = f"{value[:247]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return value


@dataclass(frozen=True)
class EndpointState:
    ready: bool
    failed: bool
    why: str


def endpoint_state(description: dict[str, Any] | None) -> EndpointState:
    """InService is ready; Failed (with its FailureReason), OutOfService or Deleting will not
    get there; anything else (Creating, Updating, SystemUpdating) may."""
    if description is None:
        return EndpointState(False, True, "the endpoint does not exist")
    status = description.get("EndpointStatus", "?")
    reason = description.get("FailureReason") or ""
    why = f"EndpointStatus {status}" + (f": {reason}" if reason else "")
    return EndpointState(status == "InService", status in FAILED_STATES, why)


def failure_kind(state: EndpointState) -> FailureKind:
    """A failed endpoint is the container's fault (its health check, its crash) unless the
    reason blames capacity, limits or permissions; one never ready in time is a timeout."""
    if not state.failed:
        return FailureKind.TIMEOUT
    return FailureKind.INFRA if INFRA_REASONS.search(state.why) else FailureKind.PRODUCT


def group_tagged(found: list[tuple[str, str, str, dict[str, str]]]
                 ) -> dict[str, dict[str, Any]]:
    """The tagged resources of a region, by sandbox (their shared name): which kinds exist,
    their ARNs, and the run, partition and expiry their tags say (an unreadable expiry is 0,
    so the janitor reaps it)."""
    sandboxes: dict[str, dict[str, Any]] = {}
    for kind, name, arn, tags in found:
        entry = sandboxes.setdefault(name, {"kinds": {}, "run_id": "", "partition": "",
                                            "expires_at": None})
        entry["kinds"][kind] = arn
        entry["run_id"] = entry["run_id"] or tags.get(RUN_TAG, "")
        entry["partition"] = entry["partition"] or tags.get(PARTITION_TAG, "")
        try:
            expires = float(tags.get(EXPIRES_TAG, ""))
        except ValueError:
            expires = 0.0
        # The earliest any of its resources says: a partial sandbox is not kept longer.
        entry["expires_at"] = expires if entry["expires_at"] is None else min(
            entry["expires_at"], expires)
    return sandboxes


def judge(status: int, text: str, *, expect_status: int, contains: list[str],
          json_equals: dict[str, Any], outputs: dict[str, str]
          ) -> tuple[list[str], dict[str, Any]]:
    """What is wrong with a response (empty: it passes), and the outputs it gives."""
    problems: list[str] = []
    if status != expect_status:
        problems.append(f"status {status}, expected {expect_status}")
    problems += [f"response lacks {text_!r}" for text_ in contains if text_ not in text]
    captured: dict[str, Any] = {}
    if json_equals or outputs:
        try:
            body = json.loads(text)
        except ValueError:
            problems.append(f"response is not JSON: {text[:200]!r}")
            return problems, captured
        for path, expected in json_equals.items():
            actual = dig(body, path, MISSING)
            if actual is MISSING:
                problems.append(f"{path} not in the response")
            elif actual != expected:
                problems.append(f"{path} = {actual!r}, expected {expected!r}")
        for key, path in outputs.items():
            value = dig(body, path, MISSING)
            if value is not MISSING:
                captured[key] = value
            else:
                problems.append(f"output '{key}': {path} not in the response")
    return problems, captured
