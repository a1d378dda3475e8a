"""Deflake reruns: a failing run is rerun on the same image and commit, up to its policy's
`reruns` times, to tell a flake (it passes on rerun) from a break (it fails every attempt).

The rule of which failure is due a rerun, and what that rerun is (its tags, its run key), for
the two paths that launch reruns: the deflake_reruns sensor (runs the daemon launched) and
`mlci run`'s runner (its own). Dagster-free.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlci_dagster.history.record import ResultRecord
from mlci_dagster.registry.models import TestConfig, TierSpec
from mlci_dagster.vocabulary import (
    ATTEMPT_TAG,
    BATCH_TAG,
    IMAGE_DIGEST_TAG,
    IMAGE_REF_TAG,
    PR_TAG,
    RERUN_OF_TAG,
    RERUNNABLE_KINDS,
    RUNS_TAG,
    SHA_TAG,
    TIER_TAG,
    TRIGGER_TAG,
    FailureKind,
    Launch,
    out_of_line,
)

# What a rerun keeps of its first attempt's tags: what it tested and the set it counts in.
KEPT_TAGS = (SHA_TAG, TIER_TAG, PR_TAG, RUNS_TAG, IMAGE_REF_TAG, IMAGE_DIGEST_TAG)


def reruns_allowed(config: TestConfig, tier: TierSpec | None) -> int:
    """How many reruns a failing run of `config` gets: its own `reruns`, else its run's
    tier's, else none."""
    if config.reruns is not None:
        return config.reruns
    return tier.reruns if tier is not None else 0


def rerun_due(launch: Launch, failure_kind: FailureKind | None, allowed: int) -> bool:
    """Whether a run that failed with `failure_kind` gets another attempt: a product or
    timeout failure of a run in line, with attempts left (attempt 1 + `allowed` reruns)."""
    return (failure_kind in RERUNNABLE_KINDS and not out_of_line(launch.trigger)
            and launch.attempt <= allowed)


def rerun_key(record: ResultRecord) -> str:
    """The next attempt's run key: each attempt of a cell launched once, whoever asks."""
    return f"rerun:{record.cell}:{record.attempt + 1}"


def rerun_tags(record: ResultRecord, tags: Mapping[str, str], image_ref: str | None
               ) -> dict[str, str]:
    """The next attempt's tags, from the failed attempt's record and run tags: the same batch
    and trigger (one cell of the grid), commit, tier and run set; the same image (a pushed
    reference pinned to the digest that was tested), and which run it reruns."""
    kept = {name: tags[name] for name in KEPT_TAGS if name in tags}
    if image_ref is not None and record.image_digest:
        kept |= {IMAGE_REF_TAG: image_ref, IMAGE_DIGEST_TAG: record.image_digest}
    return kept | {TRIGGER_TAG: record.trigger, BATCH_TAG: record.batch,
                   RERUN_OF_TAG: record.cell, ATTEMPT_TAG: str(record.attempt + 1)}
