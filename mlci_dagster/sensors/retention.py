"""The artifact_retention sensor: once a day (its cursor holds the UTC day of its last pass),
deletes from the artifact store the objects past their kind's `retention_days`, never the
evidence an open regression or an active quarantine points at (operations.prune_artifacts, as
`mlci artifacts prune`). A store down is logged, and tried again the next day."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dagster as dg

from mlci_dagster.operations import ArtifactPrune, prune_artifacts
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.sensors.image_build import registry_or_skip

LOGGED_KEYS = 20  # the keys a tick names; the rest are counted


@dg.sensor(name="artifact_retention", minimum_interval_seconds=3600,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Once a day, deletes from the artifact store the objects older than "
                       "their kind's retention_days in mlci.yaml, except the evidence of the runs "
                       "an open regression or an active quarantine points at.")
def artifact_retention(context: dg.SensorEvaluationContext, mlci: MlciResource
                       ) -> dg.SensorResult | dg.SkipReason:
    registry = registry_or_skip(mlci)
    if isinstance(registry, dg.SkipReason):
        return registry
    if not registry.settings.artifacts.retention_days:
        return dg.SkipReason("no artifacts.retention_days in mlci.yaml: every object is kept")
    now = time.time()
    today = datetime.fromtimestamp(now, UTC).date().isoformat()
    if context.cursor == today:
        return dg.SkipReason(f"pruned today already ({today} UTC)")
    done = prune_artifacts(context.instance, mlci, now)
    for error in done.errors:
        context.log.error(f"artifact retention: {error}")
    for found in done.deleted[:LOGGED_KEYS]:
        context.log.info(f"deleted {found.key} ({found.size:,} bytes)")
    text = pass_text(done)
    context.log.info(text)
    return dg.SensorResult(cursor=today, skip_reason=text)


def pass_text(done: ArtifactPrune) -> str:
    """`deleted 12 object(s) (3,456 bytes) from <where>; kept 4 referenced`, and what failed."""
    more = len(done.deleted) - LOGGED_KEYS
    text = (f"deleted {len(done.deleted)} object(s) ({done.freed_bytes:,} bytes) from "
            f"{done.where}" + (f" ({more} not named in the log)" if more > 0 else "")
            + f"; kept {len(done.kept)} past retention that open regressions or active "
            "quarantines point at")
    return text + "".join(f"; {error}" for error in done.errors)
