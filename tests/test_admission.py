"""The admission rule and its tables (launch/admission.py) on a real SQLite database, with a
clock the test sets; the race it closes, between `mlci run` and the daemon's run queue, runs
for real in test_pools.py and test_postgres_instance.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import sqlalchemy as sa

from mlci_dagster.launch.admission import (
    CLAIM_TTL_S,
    QUEUE_STALE_S,
    AdmissionError,
    AdmissionStore,
    free_slots,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> AdmissionStore:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    return AdmissionStore(engine.begin, clock=clock)


@pytest.mark.parametrize("limit, in_progress, holds, claims, free", [
    (1, 0, 0, 0, 1), (1, 1, 0, 0, 0), (1, 0, 0, 1, 0), (2, 0, 1, 0, 1), (3, 1, 1, 1, 0),
    (1, 2, 1, 0, 0),  # over the limit (runs started before a hold): none, never negative
])
def test_free_slots_is_the_limit_less_holds_claims_and_runs_in_progress(
        limit, in_progress, holds, claims, free):
    assert free_slots(limit, in_progress, holds, claims) == free


def test_claims_count_per_pool_until_released_or_stale(store, clock):
    store.claim("gpu", "run-1")
    store.claim("gpu", "run-2")
    store.claim("tpu", "run-3")

    assert store.claims() == {"gpu": 2, "tpu": 1}
    assert store.claims(besides="run-1") == {"gpu": 1, "tpu": 1}
    store.release("run-2")
    store.release("run-2")  # idempotent
    assert store.claims() == {"gpu": 1, "tpu": 1}
    clock.now += CLAIM_TTL_S + 1  # their processes are gone
    assert store.claims() == {}
    store.claim("gpu", "run-4")
    assert store.claims() == {"gpu": 1}


def test_a_holder_claims_once(store):
    store.claim("gpu", "run-1")
    store.claim("gpu", "run-1")
    assert store.claims() == {"gpu": 1}


def test_without_a_daemon_nothing_is_waited_for(store, clock):
    assert store.queue_iteration() is None
    assert store.wait_for_queue(sleep=clock.sleep) is False
    assert clock.now == 1_000_000.0

    store.count_queue_iteration()
    clock.now += QUEUE_STALE_S + 1  # the daemon stopped since
    assert store.wait_for_queue(sleep=clock.sleep) is False
    assert clock.now == 1_000_000.0 + QUEUE_STALE_S + 1


def test_with_a_daemon_a_claim_waits_for_its_next_iteration(store, clock):
    store.count_queue_iteration()
    store.count_queue_iteration()
    assert store.queue_iteration() == (2, clock.now)
    sleeps: list[float] = []

    def daemon_iterates_while_we_wait(seconds: float) -> None:
        sleeps.append(seconds)
        clock.sleep(seconds)
        if len(sleeps) == 3:
            store.count_queue_iteration()

    assert store.wait_for_queue(sleep=daemon_iterates_while_we_wait) is True
    assert len(sleeps) == 3
    assert store.queue_iteration()[0] == 3


def test_a_daemon_that_stops_iterating_is_waited_for_no_longer_than_the_stale_time(store,
                                                                                   clock):
    store.count_queue_iteration()
    start = clock.now

    assert store.wait_for_queue(sleep=clock.sleep) is False
    assert start + QUEUE_STALE_S <= clock.now <= start + QUEUE_STALE_S + 1


def test_an_unreachable_database_is_an_admission_error_naming_it(tmp_path):
    def refuse() -> contextlib.AbstractContextManager[sa.Connection]:
        raise OSError("connection refused: 127.0.0.1:5432")

    with pytest.raises(AdmissionError, match="cannot be reached: connection refused"):
        AdmissionStore(refuse).claims()
