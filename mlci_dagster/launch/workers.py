"""Which process executes an `mlci run` lifecycle run, and what to do when it is gone.

Each such run carries the executing worker's identity (pid and start time) as a tag; a run in
progress whose worker no longer runs has nobody left to end it, so the janitor and `mlci run`
mark it failed, as Dagster's run monitoring does for the runs it launches.
"""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg

from mlci_dagster.compat import report_run_failed
from mlci_dagster.providers.processes import process_start
from mlci_dagster.vocabulary import WORKER_TAG

# A run that holds its sandbox and its pool's slot: from its creation to its end, its teardown
# after a Terminate (CANCELING) included, as Dagster's run queue counts it.
IN_PROGRESS = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# A run not over yet: waiting in the queue, or in progress. A partition with one is not asked
# for again, by `mlci run` or a sensor.
UNFINISHED = [dg.DagsterRunStatus.QUEUED, *IN_PROGRESS]


def worker_identity(pid: int) -> str:
    return f"{pid}:{process_start(pid)}"


def worker_alive(identity: str) -> bool:
    """Whether the process a WORKER_TAG names still runs (the same process, not a reused pid)."""
    pid, _, start = identity.partition(":")
    return pid.isdigit() and str(process_start(int(pid))) == start


def worker_gone(run: dg.DagsterRun) -> bool:
    """Whether the run was executed by an `mlci run` worker that no longer runs."""
    return WORKER_TAG in run.tags and not worker_alive(run.tags[WORKER_TAG])


def lost_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Runs in progress whose `mlci run` worker is gone: nobody else will end them."""
    return [run for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))
            if worker_gone(run)]


def fail_lost_run(instance: dg.DagsterInstance, run: dg.DagsterRun, why: str) -> None:
    report_run_failed(instance, run, f"the process executing this run is gone: {why}")


def run_over(instance: dg.DagsterInstance) -> Callable[[str], bool]:
    """Whether a run is over: finished, unknown, or executed by an `mlci run` worker that is
    gone (such a run is marked failed by `end_lost_runs`)."""

    def over(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is None or run.is_finished or worker_gone(run)

    return over


def end_lost_runs(instance: dg.DagsterInstance) -> list[str]:
    """Marks failed every run in progress whose `mlci run` worker is gone; their ids."""
    lost = lost_runs(instance)
    for run in lost:
        fail_lost_run(instance, run, f"worker {run.tags[WORKER_TAG]} no longer runs")
    return [run.run_id for run in lost]
