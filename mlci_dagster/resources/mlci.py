"""The resource the lifecycle takes: the registry, the harness home and a lifecycle context."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from mlci_dagster.artifacts.store import ArtifactStore, artifact_store, linker
from mlci_dagster.compat import instance_connection
from mlci_dagster.cost import hourly_rate
from mlci_dagster.history.links import Linking
from mlci_dagster.launch.workers import run_over
from mlci_dagster.paths import mlci_home, ui_base_url
from mlci_dagster.providers.base import Provider, SandboxHandle
from mlci_dagster.providers.janitor import (
    Verdict,
    registry_providers,
    registry_teardown_timeout,
    sweep,
)
from mlci_dagster.registry import Registry
from mlci_dagster.registry.loader import load_registry_cached
from mlci_dagster.reservations.admission import Admission
from mlci_dagster.reservations.context import HOLD_UP, ReservationContext
from mlci_dagster.reservations.leases import LeaseError, LeaseStore
from mlci_dagster.spend import month_spend
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.vocabulary import launch_of, partition_key, split_partition_key


class MlciResource(dg.ConfigurableResource):
    """The registry folder and where sandboxes, images and logs go (default: $DAGSTER_HOME/mlci)."""

    registry_path: str
    home: str = ""

    def registry(self) -> Registry:
        return load_registry_cached(self.registry_path)

    def home_path(self) -> Path:
        return Path(self.home) if self.home else mlci_home()

    def artifact_store(self) -> ArtifactStore:
        """Where each run's evidence is uploaded (mlci.yaml's `artifacts`)."""
        return artifact_store(self.registry().settings.artifacts, self.home_path())

    def linking(self) -> Linking:
        """How views link runs and evidence: the UI's base URL and the artifact store's."""
        return Linking(ui_base_url(self.registry().settings.ui_base_url),
                       linker(self.artifact_store()))

    def providers(self) -> list[Provider]:
        """The providers the janitor and the cleanup sensors sweep."""
        return registry_providers(self.registry(), self.home_path())

    def teardown_timeout(self) -> Callable[[SandboxHandle], float]:
        """How long the janitor and the cleanup sensors wait for each sandbox they destroy."""
        return registry_teardown_timeout(self.registry())

    def reservations(self, instance: dg.DagsterInstance) -> ReservationContext:
        """Leases, holds and the guard on the instance's lease table."""
        return ReservationContext(
            self.registry(), self.home_path(),
            LeaseStore(lambda: instance_connection(instance)), run_over(instance))

    def admission(self, context: dg.AssetExecutionContext) -> Admission:
        """The run's admission to its config's reservation (a lease, or why it is refused)."""
        config, engine = split_partition_key(context.partition_key)
        return Admission(self.reservations(context.instance), config,
                         partition_key(config, engine), context.run.run_id)

    def lifecycle(self, context: dg.AssetExecutionContext, refusal: str | None = None
                  ) -> LifecycleContext:
        """The partition's lifecycle context; `refusal`: why it is skipped before it begins."""
        config, engine = split_partition_key(context.partition_key)
        registry = self.registry()
        spend, past = None, ()
        if registry.settings.budget is not None and config in registry.configs and \
                hourly_rate(registry.configs[config].config, registry.settings.costs):
            spend, costs = month_spend(context.instance, registry, context.run.run_id)
            past = costs.past(partition_key(config, engine))
        return LifecycleContext.create(
            registry, config, engine, context.run.run_id, self.home_path(),
            launch=launch_of(context.run.tags), month_spend=spend, past_costs=past,
            refusal=refusal,
        )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """The last layer inside the run's own process: reaps its sandboxes still in the ledger.

        The lifecycle tears down in a `finally`, but an interrupt that arrives while Dagster
        stores a stage's events is raised outside the lifecycle, which is then never resumed.
        This runs on every launch path, after the run has ended, before its process exits.
        """
        if context.run is not None:
            self.reap_run(context.instance, context.run.run_id)

    def reap_run(self, instance: dg.DagsterInstance, run_id: str) -> list[Verdict]:
        """Destroys the sandboxes a run left, then frees its leases; a daytime hold it stood
        up keeps its sandbox and its lease."""
        reservations = self.reservations(instance)
        verdicts = sweep(self.providers(), run_over=lambda _: True, only_run=run_id,
                         teardown_timeout=self.teardown_timeout(),
                         keep=reservations.keep_held())
        # The lease table out of reach: the janitor breaks the run's lease once it is over.
        with contextlib.suppress(LeaseError):
            for lease in reservations.store.leases():
                if lease.holder == run_id and lease.detail.get("state") != HOLD_UP:
                    reservations.store.take_back(lease)
        return verdicts
