"""The resource the lifecycle takes: the registry, the harness home and a lifecycle context."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlci_dagster.cost import hourly_rate
from mlci_dagster.janitor import registry_providers, sweep
from mlci_dagster.paths import mlci_home
from mlci_dagster.providers.base import Provider
from mlci_dagster.registry import Registry
from mlci_dagster.registry.loader import load_registry_cached
from mlci_dagster.spend import month_spend
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.vocabulary import partition_key, split_partition_key

TRIGGER_TAG = "mlci/trigger"


class MlciResource(dg.ConfigurableResource):
    """The registry folder and where sandboxes, images and logs go (default: $DAGSTER_HOME/mlci)."""

    registry_path: str
    home: str = ""

    def registry(self) -> Registry:
        return load_registry_cached(self.registry_path)

    def providers(self) -> list[Provider]:
        """The providers the janitor and the cleanup sensors sweep."""
        return registry_providers(self.registry(), Path(self.home) if self.home else mlci_home())

    def lifecycle(self, context: dg.AssetExecutionContext) -> LifecycleContext:
        config, engine = split_partition_key(context.partition_key)
        home = self.home or str(mlci_home())
        registry = self.registry()
        spend, past = None, ()
        if registry.settings.budget is not None and config in registry.configs and \
                hourly_rate(registry.configs[config].config, registry.settings.costs):
            spend, costs = month_spend(context.instance, registry, context.run.run_id)
            past = costs.past(partition_key(config, engine))
        return LifecycleContext.create(
            registry, config, engine, context.run.run_id, Path(home),
            run_tags=dict(context.run.tags), month_spend=spend, past_costs=past,
        )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """The last layer inside the run's own process: reaps its sandboxes still in the ledger.

        The lifecycle tears down in a `finally`, but an interrupt that arrives while Dagster
        stores a stage's events is raised outside the lifecycle, which is then never resumed.
        This runs on every launch path, after the run has ended, before its process exits.
        """
        if context.run is not None:
            sweep(self.providers(), run_over=lambda _: True, only_run=context.run.run_id)


def trigger_of(tags: dict[str, str]) -> str:
    """How a run was started: schedule, sensor, backfill or manual."""
    if TRIGGER_TAG in tags:
        return tags[TRIGGER_TAG]
    if "dagster/backfill" in tags:
        return "backfill"
    if "dagster/schedule_name" in tags:
        return "schedule"
    if "dagster/sensor_name" in tags:
        return "sensor"
    return "manual"
