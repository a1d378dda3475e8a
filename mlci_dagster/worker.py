"""The `mlci run` worker: one partition's lifecycle as a Dagster run, in a process of its own
(launch/runner.py starts it, watches it and stops it).

Run as `python -m mlci_dagster.worker REGISTRY KEY RUN_ID TRIGGER [BATCH [TAGS_JSON]]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator

import dagster as dg

from mlci_dagster.launch.workers import worker_identity
from mlci_dagster.vocabulary import BATCH_TAG, TRIGGER_TAG, WORKER_TAG


def execute(registry: str, key: str, run_id: str, trigger: str, batch: str = "",
            tags: str = "{}") -> bool:
    """The partition's lifecycle as Dagster run `run_id`, in `batch`, with the run's own `tags`
    (JSON: a culprit rerun's search and commit) besides. The Definitions are
    imported here, under `__main__`'s handler: an interrupt while they load ends the worker
    as one that had not begun."""
    from mlci_dagster.definitions import LIFECYCLE_JOB, build_definitions
    from mlci_dagster.launch.runner import QUIET_RUN_CONFIG

    job = build_definitions(registry).resolve_job_def(LIFECYCLE_JOB)
    with dg.DagsterInstance.get() as instance, until_stopped(instance, run_id):
        result = job.execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False, run_id=run_id,
            tags={**json.loads(tags), TRIGGER_TAG: trigger,
                  WORKER_TAG: worker_identity(os.getpid()),
                  **({BATCH_TAG: batch} if batch else {})},
            run_config=QUIET_RUN_CONFIG)
    return result.success


RESEND_S = 5.0


@contextlib.contextmanager
def until_stopped(instance: dg.DagsterInstance, run_id: str) -> Iterator[None]:
    """While the worker runs: once its run is asked to stop (CANCELING) or its parent is gone,
    SIGINT to itself every RESEND_S until the lifecycle has seen an interrupt. The first one,
    from the parent, can be lost on its way (Python drops an exception a signal handler raises
    inside a fork's callbacks or a finalizer), and the lifecycle would then run to its end.
    A failed look at the run (the database busy) is tried again at the next beat: the watch
    must not end before the run does."""
    from mlci_dagster.stages.lifecycle import INTERRUPT_SEEN

    parent = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(RESEND_S):
            if INTERRUPT_SEEN.is_set():
                return
            try:
                run = instance.get_run_by_id(run_id)
            except Exception:  # noqa: BLE001 (the database busy: look again at the next beat)
                run = None
            if run is not None and run.is_finished:
                return
            stopping = run is not None and run.status == dg.DagsterRunStatus.CANCELING
            if stopping or os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, name="mlci-until-stopped", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


if __name__ == "__main__":
    try:
        sys.exit(0 if execute(*sys.argv[1:7]) else 1)
    except KeyboardInterrupt:  # interrupted before its run began: nothing to tear down
        sys.exit(128 + signal.SIGINT)
