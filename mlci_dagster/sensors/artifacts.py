"""The artifact_upload sensor: a run's evidence that the store did not take (it was down,
refusing, or too slow) is uploaded again on later ticks until it is stored; each run whose
pieces got there is recorded as a `run_artifacts` observation. The run's record and status
never change. A piece whose file is gone from the machine is said so, once, and dropped."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import dagster as dg

from mlci_dagster.artifacts.evidence import upload
from mlci_dagster.event_log import RUN_ARTIFACTS, new_results
from mlci_dagster.history.record import PendingArtifact
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.sensors.image_build import registry_or_skip

RESULTS_PER_TICK = 500
RUNS_PER_TICK = 20
MAX_PENDING_RUNS = 1000  # runs whose evidence waits; past it, the oldest are left on the machine


@dg.sensor(name="artifact_upload", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Uploads again the evidence a run could not upload to the artifact store, "
                       "until the store takes it; records each run's late uploads as a "
                       "run_artifacts observation.")
def artifact_upload(context: dg.SensorEvaluationContext, mlci: MlciResource
                    ) -> dg.SensorResult | dg.SkipReason:
    registry = registry_or_skip(mlci)
    if isinstance(registry, dg.SkipReason):
        return registry
    state = json.loads(context.cursor or "{}")
    after: int = state.get("results_after", 0)
    waiting: dict[str, dict] = state.get("waiting", {})  # run id -> partition, pieces
    for storage_id, record in islice(new_results(context.instance, after), RESULTS_PER_TICK):
        after = storage_id
        if record.artifacts_pending:
            waiting[record.run_id] = {"partition": record.partition, "pieces": [
                p.model_dump() for p in record.artifacts_pending]}
    for run_id in list(waiting)[:max(0, len(waiting) - MAX_PENDING_RUNS)]:
        context.log.error(f"run {run_id}: its evidence waited too long; left on this machine")
        del waiting[run_id]
    store, settings = mlci.artifact_store(), registry.settings.artifacts
    events = []
    for run_id in list(waiting)[:RUNS_PER_TICK]:
        pieces = [PendingArtifact.model_validate(p) for p in waiting[run_id]["pieces"]]
        gone = [p for p in pieces if not Path(p.path).is_file()]
        stored, pending = upload(store, settings, [p for p in pieces if p not in gone])
        if stored or gone:
            events.append(dg.AssetObservation(RUN_ARTIFACTS, metadata={
                "run_id": run_id, "partition": waiting[run_id]["partition"],
                "artifacts": dg.MetadataValue.json(
                    {path: a.model_dump() for path, a in stored.items()}),
                "pending": dg.MetadataValue.json([p.model_dump() for p in pending]),
                "gone": dg.MetadataValue.json([p.path for p in gone])}))
            context.log.info(f"run {run_id}: {len(stored)} piece(s) uploaded, "
                             f"{len(pending)} still waiting, {len(gone)} gone")
        if pending:
            waiting[run_id]["pieces"] = [p.model_dump() for p in pending]
        else:
            del waiting[run_id]
        if pending and not stored:
            break  # the store is down still: the others wait for the next tick
    cursor = json.dumps({"results_after": after, "waiting": waiting})
    return dg.SensorResult(asset_events=events, cursor=cursor,
                           skip_reason=None if events else
                           f"{len(waiting)} run(s) waiting for the store" if waiting else
                           "no evidence waiting")
