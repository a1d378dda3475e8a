"""Keeps `history` (and the grid) current: whenever results were recorded after the history
table's last row, or evidence was stored after its run (a `run_artifacts` observation the table
has not read), one run of the history job consolidates them.

It compares the newest `results` event with the cursor the history table stored, so results
recorded while this sensor or the daemon was off are picked up on its first tick.
"""

from __future__ import annotations

import dagster as dg

from mlci_dagster.assets.history import HISTORY, LATE_CURSOR, TEST_HISTORY, stored_cursor
from mlci_dagster.event_log import latest_late_upload_id, latest_result_id
from mlci_dagster.launch.workers import UNFINISHED


def history_update_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(name="history_update", job=job, minimum_interval_seconds=15,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Updates history and the grid whenever results landed after the "
                           "history table's last row, or evidence reached the store late.")
    def history_update(context: dg.SensorEvaluationContext):
        newest = latest_result_id(context.instance)
        if not newest:
            return dg.SkipReason("no results recorded yet")
        cursor = min(stored_cursor(context.instance, key) for key in (HISTORY, TEST_HISTORY))
        # Evidence stored after its run: its links join the history (and the grid).
        late = latest_late_upload_id(context.instance)
        if newest <= cursor and late <= stored_cursor(context.instance, HISTORY, LATE_CURSOR):
            return dg.SkipReason(f"history is current (result {cursor})")
        if context.instance.get_runs_count(dg.RunsFilter(job_name=job.name,
                                                         statuses=UNFINISHED)):
            return dg.SkipReason("a history update is in progress")
        # One update per newest result: a failed update is retried when the next one lands.
        return dg.RunRequest(run_key=f"history:{newest}" + (f":{late}" if late else ""))

    return history_update
