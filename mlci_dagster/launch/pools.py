"""Pools: each lifecycle run carries its config's pool as a tag, and the instance's run queue
limits how many runs of a pool are in progress (Dagster's tag concurrency limits). A
reservation is a pool of its own, whose limit is its capacity less its daytime holds."""

from __future__ import annotations

from typing import Any

from mlci_dagster.registry import Registry
from mlci_dagster.registry.models import Settings
from mlci_dagster.vocabulary import POOL_TAG


def pool_of(registry: Registry, config: str) -> str:
    """The config's pool: its reservation, its pool, or by default its provider's name."""
    sandbox = registry.configs[config].config.sandbox
    return sandbox.reservation or sandbox.pool or sandbox.provider


def pool_limits(settings: Settings) -> dict[str, int]:
    """Every pool's limit: the declared pools', and each reservation's capacity."""
    limits = {name: pool.limit for name, pool in settings.pools.items()}
    limits.update({r.name: r.capacity for r in settings.reservations})
    return dict(sorted(limits.items()))


def tag_concurrency_limits(settings: Settings) -> list[dict[str, Any]]:
    return [{"key": POOL_TAG, "value": name, "limit": limit}
            for name, limit in pool_limits(settings).items()]


def lowered(limits: list[dict[str, Any]], held: dict[str, int]) -> list[dict[str, Any]]:
    """The run queue's limits with each pool's lowered by the slots `held` outside its runs in
    progress (a reservation's daytime holds, admissions in flight), never below 0: its runs
    wait in the queue meanwhile."""
    return [{**limit, "limit": max(0, limit["limit"] - held.get(limit.get("value"), 0))}
            if limit.get("key") == POOL_TAG and held.get(limit.get("value")) else limit
            for limit in limits]


def helm_values(settings: Settings) -> dict[str, Any]:
    """The same limits as values of the official Dagster Helm chart, whose instance ConfigMap
    `mlci sync` cannot write: `helm upgrade -f` them beside deploy/helm/values.yaml."""
    return {"dagsterDaemon": {"runCoordinator": {"config": {"customRunCoordinator": {
        "config": {"tag_concurrency_limits": tag_concurrency_limits(settings)}}}}}}


POOL_COORDINATOR = {"module": "mlci_dagster.launch.coordinator",
                    "class": "PoolTaggingRunCoordinator"}
# Where the coordinator lived before launch/: an instance synced then is moved on by `mlci sync`.
FORMER_MODULES = ("mlci_dagster.run_coordinator",)


def with_pool_limits(instance_settings: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """dagster.yaml's settings with the registry's pool limits as the run queue's tag limits,
    in the config of the run coordinator that tags every lifecycle run with its pool and lowers
    a reservation's limit by its holds (replacing Dagster's plain queued coordinator, keeping
    its config); every other setting is kept.

    The limits live in the coordinator's config, not under `concurrency.runs`: Dagster takes
    those over the coordinator's, which could then not lower them. Limits of other tags found
    in either place are kept, in the coordinator's config.
    """
    updated = dict(instance_settings)
    coordinator = dict(updated.get("run_coordinator") or {})
    if coordinator.get("class", "QueuedRunCoordinator") == "QueuedRunCoordinator" or (
            coordinator.get("module") in FORMER_MODULES
            and coordinator.get("class") == POOL_COORDINATOR["class"]):
        coordinator.update(POOL_COORDINATOR)
    ours = all(coordinator.get(k) == v for k, v in POOL_COORDINATOR.items())
    config = dict(coordinator.get("config") or {})
    concurrency = dict(updated.get("concurrency") or {})
    runs = dict(concurrency.get("runs") or {})
    found = [*((config.pop("tag_concurrency_limits", None) or []) if ours else []),
             *(runs.pop("tag_concurrency_limits", None) or [])]
    limits = [*(limit for limit in found if limit.get("key") != POOL_TAG),
              *tag_concurrency_limits(settings)]
    if ours:  # another coordinator: Dagster's queue reads them under concurrency.runs
        config["tag_concurrency_limits"] = limits
        coordinator["config"] = config
    else:
        runs["tag_concurrency_limits"] = limits
    updated["run_coordinator"] = coordinator
    concurrency = {**concurrency, "runs": runs} if runs else \
        {k: v for k, v in concurrency.items() if k != "runs"}
    if concurrency:
        updated["concurrency"] = concurrency
    else:
        updated.pop("concurrency", None)
    return updated
