"""Text renderings of the analysis: the `mlci report` table and the `mlci status` counts."""

from __future__ import annotations

import datetime as dt
import time

from mlci_dagster.history.analysis import PartitionSummary
from mlci_dagster.record import ResultRecord


def age(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0.0, now - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def short(digest: str | None) -> str:
    if not digest:
        return "-"
    return digest.split(":", 1)[-1][:12]


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
    return (f"{since}: {short(before['image_digest'])}→{short(found['first_fail']['image_digest'])}"
            f" ({found['verdict']}){alert}")


def flakiness_text(summary: PartitionSummary) -> str:
    if not summary.flakiness.flaky:
        return "-"
    return f"flaky ({summary.flakiness.transition_rate:.0%} flips)"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def report_table(summaries: list[PartitionSummary], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [["PARTITION", "STATUS", "LAST", "FAILED STAGE", "DURATION", "WHEN", "REGRESSION",
             "FLAKINESS"]]
    for s in summaries:
        last = s.last or {}
        finished = last.get("finished_at")
        when = (f"{dt.datetime.fromtimestamp(finished, dt.UTC):%Y-%m-%d %H:%M}Z "
                f"({age(finished, now)})" if finished else "-")
        rows.append([
            s.partition, str(s.status), last.get("status", "untested"),
            last.get("failed_stage") or "-",
            f"{last['duration_s']:.1f}s" if last.get("duration_s") is not None else "-",
            when, regression_text(s), flakiness_text(s),
        ])
    return table(rows)


def failure_notes(summaries: list[PartitionSummary], records: dict[str, ResultRecord]) -> str:
    """One paragraph per failing partition: owner, error summary's first line, log."""
    notes = []
    for s in summaries:
        record = records.get(s.partition)
        if not record or record.passed:
            continue
        first = record.error_summary.strip().splitlines()[:1]
        notes.append(f"{s.partition}: {record.status} ({record.failure_kind}, "
                     f"owner {record.owner}): {first[0] if first else ''}\n"
                     f"  log: {record.log_ref}")
    return "\n".join(notes)


def status_text(counts: dict[str, int]) -> str:
    tested = counts["tested"]
    total = counts["partitions"]
    lines = [
        f"partitions: {total}   tested: {tested} ({tested / total:.0%})   untested: "
        f"{counts['untested']}   stale: {counts['stale']}" if total else "partitions: 0",
        f"passing: {counts['passing']}   failing: {counts['failing']}   flaky: {counts['flaky']}",
    ]
    return "\n".join(lines)
