"""Text renderings of the analysis: the `mlci report` table, the `mlci tests` table and the
`mlci status` counts."""

from __future__ import annotations

import datetime as dt
import re
import time

from mlci_dagster.cost import MonthSpend, PartitionProjection
from mlci_dagster.history.analysis import PartitionSummary, SignatureCluster
from mlci_dagster.history.case_analysis import TestSummary
from mlci_dagster.history.links import NO_LINKS, Linking, evidence_keys
from mlci_dagster.history.record import ResultRecord
from mlci_dagster.registry.models import BudgetSettings
from mlci_dagster.vocabulary import FailureKind


def age(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0.0, now - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


# A content digest (OCI's registered algorithms), alone or pinning a reference.
_DIGEST = re.compile(r"^(?:[^@]*@)?(?:sha256|sha384|sha512|blake3):([0-9a-fA-F]+)$")


def short(image: str | None, hex_chars: int = 12) -> str:
    """An image as every view shows it: a digest (`sha256:<hex>`, or a reference pinned to
    one) as its first `hex_chars` hex characters; a reference recorded as written (a tag no
    registry resolved) as its last path component, `registry.test/app:1` as `app:1`; `-` for
    none."""
    if not image:
        return "-"
    if found := _DIGEST.match(image):
        return found.group(1)[:hex_chars]
    return image.rsplit("/", 1)[-1]


def counted(count: int, noun: str) -> str:
    """`1 batch`, `3 batches`, `0 results`."""
    plural = noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{count} {noun if count == 1 else plural}"


def regression_text(summary: PartitionSummary) -> str:
    """The regression range of a partition failing now, as `--json` holds it; `-` if none."""
    found = summary.regression
    if not found:
        return "-"
    alert = ", alert open" if summary.alert_open else ""
    before = found["last_pass"]
    since = f"since {found['first_fail']['run_id'][:8]}"
    if before is None:
        return f"{since} (never passed){alert}"
    culprit = found.get("culprit")
    named = f"; {culprit['text']}" if culprit and culprit["state"] == "confirmed" else ""
    return (f"{since}: {short(before['image_digest'])}→{short(found['first_fail']['image_digest'])}"
            f" ({found['verdict']}{named}){alert}")


def flakiness_text(summary: PartitionSummary) -> str:
    """`flaky (40% flips)`, and the latest cell that passed only on a rerun:
    `; passed on rerun: 37b81037→750f0e08`."""
    flakes = summary.flakiness
    if not flakes.flaky:
        return "-"
    rerun = "→".join(run[:8] for run in flakes.flaky_cells[-1]) if flakes.flaky_cells else ""
    return (f"flaky ({flakes.transition_rate:.0%} flips)"
            + (f"; passed on rerun: {rerun}" if rerun else ""))


def last_text(summary: PartitionSummary) -> str:
    """The latest run's status, or the failure whose rerun is awaited: `fail-pipeline_runs,
    rerun due`."""
    if summary.rerunning:
        return f"{summary.rerunning['status']}, rerun due"
    return (summary.last or {}).get("status", "untested")


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def report_table(summaries: list[PartitionSummary], now: float | None = None) -> str:
    """One row per partition; cost columns (last run, every recorded run) once any run has a
    cost."""
    now = time.time() if now is None else now
    costed = any(s.cost_usd for s in summaries)
    rows = [["PARTITION", "STATUS", "LAST", "FAILED STAGE", "DURATION", "WHEN", "REGRESSION",
             "FLAKINESS", *(["COST LAST", "COST TOTAL"] if costed else [])]]
    for s in summaries:
        last = s.last or {}
        finished = last.get("finished_at")
        when = (f"{dt.datetime.fromtimestamp(finished, dt.UTC):%Y-%m-%d %H:%M}Z "
                f"({age(finished, now)})" if finished else "-")
        rows.append([
            s.partition, str(s.status), last_text(s),
            last.get("failed_stage") or "-",
            f"{last['duration_s']:.1f}s" if last.get("duration_s") is not None else "-",
            when, regression_text(s), flakiness_text(s),
            *([usd(last.get("cost_usd")), usd(s.cost_usd)] if costed else []),
        ])
    return table(rows)


def failure_notes(summaries: list[PartitionSummary], records: dict[str, ResultRecord],
                  clusters: list[SignatureCluster] = (), linking: Linking = NO_LINKS) -> str:
    """The failing partitions grouped by signature, each group headed by its signature and
    since when it has been seen, then one line per partition: its status, failure kind, owner
    and the first line of its error summary, its log and debug bundle (their links in the
    artifact store, else their paths on the machine that ran it), its Dagster run, and the
    failing tests its pipelines reported. Refused and interrupted ones (skip, canceled)
    last."""
    by_partition = {p: c for c in clusters for p in c.partitions}
    groups: dict[str, list[str]] = {}
    refused = []
    for s in summaries:
        record = records.get(s.partition)
        if not record or record.passed:
            continue
        first = record.error_summary.strip().splitlines()[:1]
        if not record.judged:  # refused before it began, or interrupted: no verdict
            refused.append(f"{s.partition}: {record.status}: {first[0] if first else ''}")
            continue
        cluster = by_partition.get(s.partition)
        whose = " (the test's own setup)" if record.failure_kind is FailureKind.CONFIG else ""
        links = linking.of(record.run_id, *evidence_keys(record.artifacts, record.log_ref,
                                                         record.debug_bundle))
        groups.setdefault(cluster.signature if cluster else "", []).append(
            f"  {s.partition}: {record.status} ({record.failure_kind}{whose}, owner "
            f"{record.owner}): {first[0] if first else ''}"
            f"\n    log: {links.log or record.log_ref or '-'}"
            + (f"\n    debug bundle: {links.bundle or record.debug_bundle}"
               if record.debug_bundle else "")
            + (f"\n    run: {links.run}" if links.run else "")
            + (f"\n    tests: {tests}" if (tests := record.failing_tests_text()) else ""))
    heads = {c.signature: signature_head(c) for c in clusters}
    notes = [heads.get(signature, "failing, signature unknown (recorded before signatures):")
             + "\n" + "\n".join(lines) for signature, lines in groups.items()]
    return "\n\n".join([*notes, *refused])


def signature_head(cluster: SignatureCluster) -> str:
    """`2 partitions fail with <signature> [id], since <when>, image <digest> (<batch>)`"""
    first = cluster.first_seen
    when = dt.datetime.fromtimestamp(first["finished_at"], dt.UTC).strftime("%Y-%m-%d %H:%MZ")
    count = len(cluster.partitions)
    return (f"{count} partition{'s' if count != 1 else ''} fail{'' if count != 1 else 's'} with "
            f"{cluster.text} [{cluster.signature}]\n  since {when}, image "
            f"{short(first['image_digest'])}" + (f" ({first['batch']})" if first["batch"] else "")
            + f", {cluster.runs} run{'s' if cluster.runs != 1 else ''} in all:")


def status_text(counts: dict[str, int]) -> str:
    tested = counts["tested"]
    total = counts["partitions"]
    lines = [
        f"partitions: {total}   tested: {tested} ({tested / total:.0%})   untested: "
        f"{counts['untested']}   stale: {counts['stale']}" if total else "partitions: 0",
        f"passing: {counts['passing']}   failing: {counts['failing']}   flaky: {counts['flaky']}",
    ]
    return "\n".join(lines)


def cost_text(projections: list[PartitionProjection], spend: MonthSpend,
              budget: BudgetSettings | None, cron: str, now: float) -> str:
    """`mlci cost`: per billed partition, the month so far and projected; then the totals."""
    month = f"{dt.datetime.fromtimestamp(now, dt.UTC):%Y-%m}"
    if not projections:
        return f"{month}: no partition bills anything (local and kubernetes sandboxes are free)"
    rows = [["PARTITION", "RATE/H", "RUNS", "SPENT", "PER RUN", "RUNS LEFT", "PROJECTED",
             "PER RUN FROM"]]
    for p in projections:
        rows.append([p.partition, f"${p.rate_usd_h:g}", str(p.runs), usd(p.spent_usd),
                     usd(p.per_run.usd), "-" if p.runs_left is None else str(p.runs_left),
                     usd(p.projected_usd), p.per_run.basis])
    projected = sum(p.projected_usd for p in projections)
    bounded = [p for p in projections if p.upper_bound]
    lines = [f"{month} (UTC), nightly schedule '{cron}' ('-': not on it, runs on demand)",
             table(rows), "",
             f"recorded this month: {usd(spend.recorded_usd)}"
             + (f"   in progress: {usd(spend.in_progress_usd)} ({spend.in_progress_runs} runs)"
                if spend.in_progress_runs else ""),
             f"projected for the month: {usd(projected)}"
             + (f" (an upper bound: {len(bounded)} scheduled partition(s) never recorded a run, "
                "estimated from their stage timeouts)" if bounded else "")]
    if budget is not None:
        share = projected / budget.monthly_usd
        verdict = "within budget" if projected <= budget.monthly_usd else \
            "OVER BUDGET: runs that would exceed it are refused (skip)"
        lines.append(f"budget: ${budget.monthly_usd:g}/month; projected {share:.0%} of it, "
                     f"{verdict}")
    return "\n".join(lines)


def test_history_text(test: TestSummary) -> str:
    """What the test's history says: its failing streak and range, its flips, its slowdown."""
    if test.first_failure is not None:
        since = test.first_failure
        text = f"failing {counted(test.failing_streak, 'run')} since {since['batch'] or '-'}"
        if test.last_pass is not None:
            text += (f" (image {short(test.last_pass['image_digest'])}→"
                     f"{short(since['image_digest'])})")
        return text
    if str(test.state) == "flaky":
        return f"{counted(test.flips, 'flip')} in its recent runs"
    if test.slower_by:
        return f"{test.duration_s:g}s, {test.slower_by:.0%} over its median {test.baseline_s:g}s"
    return "new" if test.new else "-"


def tests_table(tests: list[TestSummary], limit: int, empty: str = "no test results recorded"
                ) -> str:
    """A row per test (failing, then flaky, then slowest), at most `limit`, and what was cut;
    `empty` when there is none."""
    rows = [["PARTITION", "TEST", "STATE", "HISTORY", "MESSAGE"]]
    for test in tests[:limit]:
        message = test.message.splitlines()[0][:80] if test.message else ""
        rows.append([test.partition, test.test_id, str(test.state), test_history_text(test),
                     message])
    more = f"\n... and {len(tests) - limit} more (--limit)" if len(tests) > limit else ""
    return (table(rows) if tests else empty) + more
