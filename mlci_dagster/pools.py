"""Pools: each lifecycle run carries its config's pool as a tag, and the instance's run queue
limits how many runs of a pool are in progress (Dagster's tag concurrency limits)."""

from __future__ import annotations

from typing import Any

from mlci_dagster.registry import Registry
from mlci_dagster.registry.models import Settings

POOL_TAG = "mlci/pool"


def pool_of(registry: Registry, config: str) -> str:
    """The config's pool; by default its provider's name."""
    sandbox = registry.configs[config].config.sandbox
    return sandbox.pool or sandbox.provider


def tag_concurrency_limits(settings: Settings) -> list[dict[str, Any]]:
    return [{"key": POOL_TAG, "value": name, "limit": pool.limit}
            for name, pool in sorted(settings.pools.items())]


def helm_values(settings: Settings) -> dict[str, Any]:
    """The same limits as values of the official Dagster Helm chart, whose instance ConfigMap
    `mlci sync` cannot write: `helm upgrade -f` them beside deploy/helm/values.yaml."""
    return {"concurrency": {"enabled": True,
                            "runs": {"tagConcurrencyLimits": tag_concurrency_limits(settings)}}}


POOL_COORDINATOR = {"module": "mlci_dagster.run_coordinator",
                    "class": "PoolTaggingRunCoordinator"}


def with_pool_limits(instance_settings: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """dagster.yaml's settings with the registry's pool limits as the run queue's tag limits,
    and the run coordinator that tags every lifecycle run with its pool (replacing Dagster's
    plain queued coordinator, keeping its config); every other setting is kept."""
    updated = dict(instance_settings)
    concurrency = dict(updated.get("concurrency") or {})
    runs = dict(concurrency.get("runs") or {})
    runs["tag_concurrency_limits"] = tag_concurrency_limits(settings)
    concurrency["runs"] = runs
    updated["concurrency"] = concurrency
    coordinator = dict(updated.get("run_coordinator") or {})
    if coordinator.get("class", "QueuedRunCoordinator") == "QueuedRunCoordinator":
        updated["run_coordinator"] = {**coordinator, **POOL_COORDINATOR}
    return updated
