"""One notification, about one failure signature: the partitions that fail with it, its first
failure's details and links. Plain data: every channel renders it.

A cause that breaks fourteen partitions is one notification, not fourteen: a new signature is
announced once, with every partition it reached in that tick; later partitions that join it
are one `spread` notification; when none fails with it any more, one `resolved`. Regression
alerts the history opens are grouped by signature the same way.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from mlci_dagster.history.links import Link, Linking, evidence_keys, run_link
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.history.signature import Signature, signature_of


class Kind(enum.StrEnum):
    SIGNATURE = "signature"  # a failure signature seen for the first time (since it resolved)
    SPREAD = "spread"  # more partitions fail with an open signature
    RESOLVED = "resolved"  # no partition fails with the signature any more
    REGRESSION = "regression"  # the history analysis opened alerts for partitions failing so
    CULPRIT = "culprit"  # a culprit search named the commit that broke a partition, or stopped
    QUARANTINE = "quarantine"  # a partition flaky past the threshold: its quarantine proposed


@dataclass
class Notification:
    """What one message says; `key` identifies it (kind, signature and run) for retries and
    logs; `signature` is its subject: one GitHub issue per signature."""

    kind: Kind
    signature: str  # the signature's id
    title: str
    signature_text: str = ""
    partitions: list[str] = field(default_factory=list)
    status: str = ""
    failed_stage: str = ""
    failure_kind: str = ""
    owner: str = ""
    error_summary: str = ""
    run_id: str = ""
    run_url: str = ""
    log_ref: str = ""  # the failing stage's log, on the machine that ran it
    debug_bundle: str = ""
    log_url: str = ""  # the same in the artifact store, once stored
    bundle_url: str = ""
    image_digest: str = ""
    verdict: str = ""
    # A root-cause hypothesis by a language model, when one is configured; always shown
    # labelled as machine-generated.
    hypothesis: str = ""
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.signature}:{self.run_id}"

    def links(self) -> dict[str, str]:
        """Label -> target of every link the message carries: URLs, else paths on the host
        that ran it (evidence the store did not take yet)."""
        return {label: target for label, target in (
            ("Dagster run", self.run_url), ("log", self.log_url or self.log_ref),
            ("debug bundle", self.bundle_url or self.debug_bundle)) if target}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = str(self.kind)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notification:
        return cls(**{**data, "kind": Kind(data["kind"])})


def signature_of_record(record: ResultRecord) -> Signature:
    found = signature_of(record.failed_stage, record.failure_kind, record.error_summary)
    assert found is not None, "a failed record has a failed stage"
    return found


def partitions_text(partitions: list[str]) -> str:
    count = len(partitions)
    return f"{count} partition{'s' if count != 1 else ''}"


def signature_notification(records: list[ResultRecord], dagster_url: str,
                           kind: Kind = Kind.SIGNATURE, link: Link | None = None
                           ) -> Notification:
    """From the failed records of one signature (a tick's worth): the partitions, and the first
    record's stage, owner, (redacted) summary and links (`link`: the artifact store's, for its
    log and bundle); every run linked in the facts."""
    first = records[0]
    evidence = Linking(dagster_url, link).of(first.run_id, *evidence_keys(
        first.artifacts, first.log_ref, first.debug_bundle))
    signature = signature_of_record(first)
    partitions = sorted({r.partition for r in records})
    owners = sorted({r.owner for r in records if r.owner})
    what = "new failure" if kind is Kind.SIGNATURE else "spreads to"
    title = (f"{what}: {partitions_text(partitions)} "
             f"({', '.join(partitions[:3])}{', ...' if len(partitions) > 3 else ''}) "
             f"{'fail' if len(partitions) != 1 else 'fails'} with {signature.text}")
    return Notification(
        kind=kind, signature=signature.id, title=title, signature_text=signature.text,
        partitions=partitions, status=first.status, failed_stage=str(first.failed_stage or ""),
        failure_kind=str(first.failure_kind or ""), owner=", ".join(owners),
        error_summary=first.error_summary, run_id=first.run_id,
        run_url=evidence.run, log_ref=first.log_ref, debug_bundle=first.debug_bundle,
        log_url=evidence.log, bundle_url=evidence.bundle, image_digest=first.image_digest or "",
        facts={"trigger": first.trigger, "code version": first.code_version,
               **({"failing tests": tests} if (tests := first.failing_tests_text(10)) else {}),
               **{f"run of {r.partition}": run_link(dagster_url, r.run_id) or r.run_id
                  for r in records[:10]}},
    )


def resolved_notification(signature: str, text: str, last: ResultRecord | None,
                          dagster_url: str, partitions: list[str]) -> Notification:
    """No partition fails with the signature any more: `last` is the result that ended it."""
    return Notification(
        kind=Kind.RESOLVED, signature=signature, signature_text=text,
        title=f"resolved: no partition fails with {text} any more "
              f"({', '.join(partitions)} pass{'es' if len(partitions) == 1 else ''} again "
              "or fail otherwise)",
        partitions=partitions, run_id=last.run_id if last else "",
        run_url=run_link(dagster_url, last.run_id) if last else "",
        image_digest=(last.image_digest or "") if last else "",
    )


def regression_notification(signature: str, text: str, alerts: dict[str, dict[str, Any]],
                            dagster_url: str, link: Link | None = None) -> Notification:
    """From the history's newly opened alerts of one signature (partition -> its regression:
    last pass, first fail, verdict); its first failure's log and bundle linked by `link`."""
    partitions = sorted(alerts)
    regression = alerts[partitions[0]]
    first_fail = regression.get("first_fail") or {}
    evidence = Linking(dagster_url, link).of_row(first_fail)
    last_pass = regression.get("last_pass") or {}
    verdicts = sorted({a.get("verdict") or "failing" for a in alerts.values()})
    facts = {"failing runs": ", ".join(f"{p}: {alerts[p].get('failing_runs', '?')}"
                                      for p in partitions),
             "first failing run": first_fail.get("run_id") or "",
             "first failing image": first_fail.get("image_digest") or "",
             "last passing run": last_pass.get("run_id") or "none on record",
             "last passing image": last_pass.get("image_digest") or "",
             "culprit search": (regression.get("culprit") or {}).get("text") or ""}
    return Notification(
        kind=Kind.REGRESSION, signature=signature, signature_text=text,
        title=f"regressed: {partitions_text(partitions)} ({', '.join(partitions)}) with "
              f"{text or 'an unknown signature'}: {'; '.join(verdicts)}",
        partitions=partitions, status=first_fail.get("status") or "",
        failed_stage=first_fail.get("failed_stage") or "",
        run_id=first_fail.get("run_id") or "", run_url=evidence.run,
        log_ref=first_fail.get("log_ref") or "", debug_bundle=first_fail.get("debug_bundle") or "",
        log_url=evidence.log, bundle_url=evidence.bundle,
        image_digest=first_fail.get("image_digest") or "", verdict="; ".join(verdicts),
        facts={k: v for k, v in facts.items() if v},
    )


def culprit_notification(found: dict[str, Any], dagster_url: str) -> Notification:
    """From a culprit search's final summary (searches.Step.summary): the commit it named and
    the runs that confirmed it, or why it stopped; on the signature's issue."""
    search = found["search"]
    reruns = found.get("reruns", [])
    return Notification(
        kind=Kind.CULPRIT, signature=search["signature"], signature_text=search["signature_text"],
        title=f"{search['partition']}: {found['text']}", partitions=[search["partition"]],
        run_id=search["id"], verdict=found["text"],
        facts={"range": f"{len(search['commits'])} commits after {search['last_pass'][:12]}",
               "first failing run": run_link(dagster_url, search["first_fail_run"])
               or search["first_fail_run"],
               **{f"rerun at {r['commit'][:12]} ({r['kind']})":
                  f"{r['status']}: {run_link(dagster_url, r['run_id']) or r['run_id']}"
                  for r in reruns}},
    )


def quarantine_notification(flaky: dict[str, Any], threshold: float, expires: str,
                            dagster_url: str) -> Notification:
    """A partition or test flaky past `threshold` (its entry of the history's
    no_flaky_partitions or no_flaky_tests check): its quarantine proposed, never made; the
    command that makes it, on the issue of the signature it last failed with."""
    partition, rate, test = flaky["partition"], float(flaky["transition_rate"]), flaky.get("test")
    target = partition + (f" :: {test}" if test else "")
    cells = flaky.get("flaky_cells") or []
    command = (f"mlci quarantine add '{partition}'" + (f" --test '{test}'" if test else "")
               + f" --owner <owner> --reason 'flaky: {rate:.0%} flips' --expires {expires}")
    return Notification(
        kind=Kind.QUARANTINE, signature=flaky.get("signature") or "",
        signature_text=flaky.get("signature_text") or (f"{test} fails" if test else ""),
        title=f"quarantine proposed: {target} is flaky ({rate:.0%} flips in its last "
              f"{flaky.get('runs', '?')} runs, over the {threshold:.0%} threshold)",
        partitions=[partition], run_id=f"{target}:{expires}",
        verdict="proposed, not quarantined: nothing is quarantined until someone runs the "
                "command",
        facts={"to quarantine it": command,
               **({"passed only on rerun": ", ".join("→".join(run[:8] for run in cell)
                                                     for cell in cells[-3:])} if cells else {}),
               **({"latest flaky run": run_link(dagster_url, cells[-1][-1])} if cells and
                  dagster_url else {})},
    )


def summary_lines(notification: Notification) -> list[tuple[str, str]]:
    """(label, value) of every fact worth a line, in reading order; empty values left out."""
    n = notification
    lines = [("signature", f"{n.signature_text} [{n.signature}]" if n.signature_text else ""),
             ("partitions", ", ".join(n.partitions)), ("status", n.status),
             ("failing stage", n.failed_stage), ("failure kind", n.failure_kind),
             ("owner", n.owner), ("verdict", n.verdict), ("image", n.image_digest),
             ("run", n.run_id), *n.facts.items(),
             ("root-cause hypothesis (machine-generated, unverified)", n.hypothesis)]
    return [(label, value) for label, value in lines if value]
