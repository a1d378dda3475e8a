"""One notification, built from a results record (a failed or recovered lifecycle) or from a
history regression (an alert that opened), with its links. Plain data: every channel renders it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from mlci_dagster.record import ResultRecord
from mlci_dagster.vocabulary import split_partition_key


class Kind(enum.StrEnum):
    FAILURE = "failure"  # a lifecycle failed
    RECOVERY = "recovery"  # a partition passes again after a failure
    REGRESSION = "regression"  # the history analysis opened an alert for the partition


@dataclass
class Notification:
    """What one message says; `key` identifies it (kind, partition and run) for retries and logs."""

    kind: Kind
    partition: str
    title: str
    status: str = ""
    failed_stage: str = ""
    failure_kind: str = ""
    owner: str = ""
    error_summary: str = ""
    run_id: str = ""
    run_url: str = ""
    log_ref: str = ""
    debug_bundle: str = ""
    image_digest: str = ""
    verdict: str = ""
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.partition}:{self.run_id}"

    @property
    def config(self) -> str:
        return split_partition_key(self.partition)[0]

    @property
    def engine(self) -> str:
        return split_partition_key(self.partition)[1]

    def links(self) -> dict[str, str]:
        """Label -> target of every link the message carries (URLs and paths on the host)."""
        return {label: target for label, target in (
            ("Dagster run", self.run_url), ("log", self.log_ref),
            ("debug bundle", self.debug_bundle)) if target}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notification:
        return cls(**{**data, "kind": Kind(data["kind"])})


def run_url(dagster_url: str, run_id: str) -> str:
    return f"{dagster_url.rstrip('/')}/runs/{run_id}" if dagster_url and run_id else ""


def failure_notification(record: ResultRecord, dagster_url: str) -> Notification:
    """From a failed `results` record: the failing stage, its owner, the (redacted) summary."""
    stage = str(record.failed_stage or "")
    return Notification(
        kind=Kind.FAILURE, partition=record.partition,
        title=f"{record.partition} failed at {stage or 'an unknown stage'}",
        status=record.status, failed_stage=stage,
        failure_kind=str(record.failure_kind or ""), owner=record.owner or "",
        error_summary=record.error_summary, run_id=record.run_id,
        run_url=run_url(dagster_url, record.run_id),
        log_ref=record.log_ref, debug_bundle=record.debug_bundle,
        image_digest=record.image_digest or "",
        facts={"trigger": record.trigger, "code version": record.code_version},
    )


def recovery_notification(record: ResultRecord, dagster_url: str) -> Notification:
    """From a passing `results` record of a partition whose previous result failed."""
    return Notification(
        kind=Kind.RECOVERY, partition=record.partition,
        title=f"{record.partition} passes again", status=record.status,
        run_id=record.run_id, run_url=run_url(dagster_url, record.run_id),
        image_digest=record.image_digest or "",
    )


def regression_notification(
    partition: str, regression: dict[str, Any], dagster_url: str, failing_runs: int = 0
) -> Notification:
    """From a history regression (PartitionSummary.regression): last pass, first fail, verdict."""
    first_fail = regression.get("first_fail") or {}
    last_pass = regression.get("last_pass") or {}
    facts = {"failing runs": str(failing_runs) if failing_runs else "",
             "first failing run": first_fail.get("run_id") or "",
             "first failing image": first_fail.get("image_digest") or "",
             "last passing run": last_pass.get("run_id") or "none on record",
             "last passing image": last_pass.get("image_digest") or ""}
    return Notification(
        kind=Kind.REGRESSION, partition=partition,
        title=f"{partition} regressed: {regression.get('verdict') or 'failing'}",
        status=first_fail.get("status") or "", failed_stage=first_fail.get("failed_stage") or "",
        run_id=first_fail.get("run_id") or "",
        run_url=run_url(dagster_url, first_fail.get("run_id") or ""),
        image_digest=first_fail.get("image_digest") or "",
        verdict=regression.get("verdict") or "", facts={k: v for k, v in facts.items() if v},
    )


def summary_lines(notification: Notification) -> list[tuple[str, str]]:
    """(label, value) of every fact worth a line, in reading order; empty values left out."""
    n = notification
    lines = [("partition", n.partition), ("status", n.status), ("failing stage", n.failed_stage),
             ("failure kind", n.failure_kind), ("owner", n.owner), ("verdict", n.verdict),
             ("image", n.image_digest), ("run", n.run_id), *n.facts.items()]
    return [(label, value) for label, value in lines if value]
