"""The project's words, defined once: the lifecycle's stages, outcome statuses, failure kinds, the
lifecycle status (`pass` / `fail-<stage>`), the `config|engine` partition key, and every run tag
(Dagster's that are read, and the project's own), with how a run's trigger and batch follow
from them.

The lowest layer: everything else (registry, stages, history, notify, the Dagster layer) imports
it, and it imports nothing of the project.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Stage(enum.StrEnum):
    """The lifecycle's stages, in the order they run."""

    IMAGE = "image"
    SANDBOX = "sandbox"
    PIPELINE_RUNS = "pipeline_runs"
    UI_SMOKE = "ui_smoke"
    TEARDOWN = "teardown"


STAGES: tuple[Stage, ...] = tuple(Stage)
RESULTS = "results"  # the asset holding one lifecycle record per run of a partition
CULPRIT_SEARCH = "culprit_search"  # observed: each state a culprit search reaches
HELD_SANDBOX = "held_sandbox"  # a reservation's daytime deployment, partitioned by reservation
HOLD_UP_JOB, HOLD_DOWN_JOB = "hold_up", "hold_down"  # the jobs that stand it up and take it down


class Status(enum.StrEnum):
    """What one stage did."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


class FailureKind(enum.StrEnum):
    """Why a stage failed: the product (a test verdict), the infrastructure, a time limit, or
    the test configuration itself (a command that does not exist, a reference that does not
    resolve at run time): the test's own fault, owned by the config's owners."""

    PRODUCT = "product"
    INFRA = "infra"
    TIMEOUT = "timeout"
    CONFIG = "config"


# The failures that a rerun can tell something of (a flake from a break, the commit that broke
# it): the product's and a time limit's. An infra failure says nothing of the product; a config
# failure is the test's own, the same on every attempt.
RERUNNABLE_KINDS = (FailureKind.PRODUCT, FailureKind.TIMEOUT)

LIFECYCLE_PASS = "pass"
# Refused before anything was created (a budget that the run would exceed, a reservation that
# is dirty): neither a pass nor a failure, and left out of the history's analysis.
LIFECYCLE_SKIP = "skip"
# Interrupted before it finished (Ctrl-C of `mlci run`, Terminate in the UI), its sandbox torn
# down: it says nothing of the product, and is left out of the history's analysis too.
LIFECYCLE_CANCELED = "canceled"
_FAIL_PREFIX = "fail-"


def lifecycle_status(failed_stage: Stage | str | None, refused: bool = False,
                     interrupted: bool = False) -> str:
    """`pass`, `fail-<first failing stage>`, `skip` for a lifecycle refused before it began, or
    `canceled` for one interrupted before it finished (whatever had failed by then)."""
    if interrupted:
        return LIFECYCLE_CANCELED
    if failed_stage is not None:
        return f"{_FAIL_PREFIX}{failed_stage}"
    return LIFECYCLE_SKIP if refused else LIFECYCLE_PASS


def passed(lifecycle: str | None) -> bool:
    """Whether a lifecycle status (`pass`, `fail-<stage>`) is a pass."""
    return lifecycle == LIFECYCLE_PASS


def skipped(lifecycle: str | None) -> bool:
    """Whether a lifecycle status is `skip` (refused before it began)."""
    return lifecycle == LIFECYCLE_SKIP


def canceled(lifecycle: str | None) -> bool:
    """Whether a lifecycle status is `canceled` (interrupted before it finished)."""
    return lifecycle == LIFECYCLE_CANCELED


def judged(lifecycle: str | None) -> bool:
    """Whether a lifecycle status is a verdict on what it tested (`pass` or `fail-<stage>`),
    which the history's rules count; a refusal or an interruption is none."""
    return lifecycle is not None and not skipped(lifecycle) and not canceled(lifecycle)


def failed_stage_of(lifecycle: str) -> Stage | None:
    """The stage a `fail-<stage>` status names; None for `pass`."""
    return Stage(lifecycle.removeprefix(_FAIL_PREFIX)) if lifecycle.startswith(_FAIL_PREFIX) \
        else None


KEY_SEPARATOR = "|"


def partition_key(config: str, engine: str) -> str:
    """The `config|engine` key of one matrix cell (config names cannot hold `|`)."""
    return f"{config}{KEY_SEPARATOR}{engine}"


def split_partition_key(key: str) -> tuple[str, str]:
    """(config, engine) of a `config|engine` key; ValueError for anything else."""
    config, separator, engine = str(key).partition(KEY_SEPARATOR)
    if not separator or not config or not engine:
        raise ValueError(f"partition key {key!r}: expected 'config|engine'")
    return config, engine


# --- run tags ---------------------------------------------------------------------------------
# Dagster's own, as the project reads them.
PARTITION_TAG = "dagster/partition"
BACKFILL_TAG = "dagster/backfill"
SCHEDULE_TAG = "dagster/schedule_name"
SENSOR_TAG = "dagster/sensor_name"
# The project's.
POOL_TAG = "mlci/pool"  # the pool a lifecycle run counts against (the run queue's limits)
TRIGGER_TAG = "mlci/trigger"  # how a run was started, when its launcher says so (`mlci run`)
WORKER_TAG = "mlci/worker"  # "<pid>:<start>" of the `mlci run` worker executing the run
# The batch a run belongs to (a night, a commit, an image, an `mlci run`): the grid's columns.
# Where no launcher set it, one is derived from the run's other tags (launch_of).
BATCH_TAG = "mlci/batch"
SHA_TAG = "mlci/sha"  # the commit a tier's run tests
TIER_TAG = "mlci/tier"
PR_TAG = "mlci/pr"
RUNS_TAG = "mlci/runs"  # how many runs the set of this SHA and tier holds
IMAGE_DIGEST_TAG = "mlci/image_digest"  # the image a sensor saw built
IMAGE_REF_TAG = "mlci/image_ref"
# A culprit search's reruns: the search they belong to, and why each ran (to bisect the range,
# or to verify a culprit). Their trigger is CULPRIT_TRIGGER: they test commits out of line, so
# no partition's state, alert or notification counts them.
SEARCH_TAG = "mlci/culprit_search"
RERUN_KIND_TAG = "mlci/rerun_kind"
CULPRIT_TRIGGER = "culprit-search"
# A deflake rerun: the run whose failure it reruns (the cell's first attempt, for every
# attempt after it) and which attempt it is (2 for the first rerun). It keeps the first
# attempt's trigger and batch: the attempts are one cell of the grid.
RERUN_OF_TAG = "mlci/rerun_of"
ATTEMPT_TAG = "mlci/attempt"


def trigger_of(tags: Mapping[str, str]) -> str:
    """How a run was started: schedule, sensor, backfill or manual (or its launcher's word)."""
    if TRIGGER_TAG in tags:
        return tags[TRIGGER_TAG]
    if BACKFILL_TAG in tags:
        return "backfill"
    if SCHEDULE_TAG in tags:
        return "schedule"
    if SENSOR_TAG in tags:
        return "sensor"
    return "manual"


def out_of_line(trigger: str | None) -> bool:
    """Whether a run with this trigger tested a commit out of line (a culprit search's rerun of
    an older one): no partition's state, alert or notification counts it."""
    return trigger == CULPRIT_TRIGGER


@dataclass(frozen=True)
class Launch:
    """How a run was started and what for, as its tags say: all the Dagster-free stages know
    of the run they are in (they read no tag)."""

    trigger: str = "manual"
    # Its launcher's batch, else its commit, image or backfill; None: a batch of its trigger
    # and UTC day (`batch_at`).
    batch: str | None = None
    # The pushed image a sensor started the run for: tested even if its tag has moved on.
    image_ref: str | None = None
    image_digest: str | None = None
    # The commit the run tests (a tier's run set, a culprit search's rerun): its image is
    # built from that commit's tree.
    sha: str | None = None
    tier: str | None = None  # the tier whose run set it is (its reruns policy applies)
    attempt: int = 1  # 2 and on: a deflake rerun of the cell's first attempt, `rerun_of`
    rerun_of: str | None = None

    def batch_at(self, started_at: float) -> str:
        """The batch the run belongs to: the grid's column."""
        day = dt.datetime.fromtimestamp(started_at, dt.UTC)
        return self.batch or f"{self.trigger} {day:%Y-%m-%d}"


def launch_of(tags: Mapping[str, str]) -> Launch:
    """The run's Launch, read from its tags."""
    batch = tags.get(BATCH_TAG) or (
        f"culprit search {tags[SEARCH_TAG]}" if SEARCH_TAG in tags else
        f"commit {tags[SHA_TAG][:10]}" if SHA_TAG in tags else
        f"image {tags[IMAGE_DIGEST_TAG].removeprefix('sha256:')[:12]}" if IMAGE_DIGEST_TAG in tags
        else f"backfill {tags[BACKFILL_TAG]}" if BACKFILL_TAG in tags else None)
    return Launch(trigger=trigger_of(tags), batch=batch, image_ref=tags.get(IMAGE_REF_TAG),
                  image_digest=tags.get(IMAGE_DIGEST_TAG), sha=tags.get(SHA_TAG),
                  tier=tags.get(TIER_TAG), attempt=attempt_of(tags),
                  rerun_of=tags.get(RERUN_OF_TAG))


def attempt_of(tags: Mapping[str, str]) -> int:
    """Which attempt of its cell a run is: 1, or its ATTEMPT_TAG (a malformed one counts as a
    rerun, never as a first attempt)."""
    if RERUN_OF_TAG not in tags:
        return 1
    try:
        return max(2, int(tags.get(ATTEMPT_TAG, "2")))
    except ValueError:
        return 2
