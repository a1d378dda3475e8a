"""The deflake_reruns sensor: each new results record of a failure due a rerun (its reruns
policy allows one; a product or timeout failure) → the rerun, a lifecycle run of the partition
on the same image and commit, tagged with the run it reruns and its attempt (run key: each
attempt once). `mlci run` reruns its own runs; this sensor leaves them to it."""

from __future__ import annotations

import json
from itertools import islice

import dagster as dg

from mlci_dagster.assets.partitions import multi_partition_key
from mlci_dagster.event_log import new_results
from mlci_dagster.launch.reruns import due_rerun
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.sensors.image_build import registry_or_skip, results_after
from mlci_dagster.vocabulary import WORKER_TAG, split_partition_key

RESULTS_PER_TICK = 500


def deflake_reruns_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(name="deflake_reruns", job=job, minimum_interval_seconds=15,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Reruns a run that failed for the product or a timeout, on the same "
                           "image and commit, as often as its config's or tier's `reruns` "
                           "allow: a failure that passes on rerun is flaky (no regression, no "
                           "issue); one that fails every attempt is confirmed.")
    def deflake_reruns(context: dg.SensorEvaluationContext, mlci: MlciResource
                       ) -> dg.SensorResult | dg.SkipReason:
        registry = registry_or_skip(mlci)
        if isinstance(registry, dg.SkipReason):
            return registry
        instance = context.instance
        after = results_after(context)
        if isinstance(after, dg.SensorResult):
            return after
        requests = []
        for storage_id, record in islice(new_results(instance, after), RESULTS_PER_TICK):
            after = storage_id
            if not record.awaiting_rerun:
                continue
            run = instance.get_run_by_id(record.run_id)
            tags = run.tags if run is not None else {}
            if WORKER_TAG in tags:
                continue  # an `mlci run` worker's: that runner reruns it
            rerun = due_rerun(instance, registry, record, tags)
            if rerun is None:
                continue
            context.log.info(f"{record.partition}: run {record.run_id[:8]} failed "
                             f"({record.failure_kind}); attempt {rerun.attempt}")
            requests.append(dg.RunRequest(
                partition_key=multi_partition_key(*split_partition_key(rerun.partition)),
                run_key=rerun.run_key, tags=rerun.tags))
        return dg.SensorResult(run_requests=requests,
                               cursor=json.dumps({"results_after": after}),
                               skip_reason=None if requests else "no failure due a rerun")

    return deflake_reruns
