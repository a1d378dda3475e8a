"""Keeps the dynamic `config` partitions equal to the registry's configs (adds and removes)."""

import dagster as dg

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, partition_changes
from mlci_dagster.registry import RegistryError
from mlci_dagster.resources.mlci import MlciResource


@dg.sensor(
    name="registry_sync", minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a config partition for each new registry file and removes deleted ones.",
)
def registry_sync(context: dg.SensorEvaluationContext, mlci: MlciResource) -> dg.SensorResult:
    try:
        registry = mlci.registry()
    except RegistryError as exc:
        # Nothing half-loaded: an invalid registry changes no partition.
        return dg.SensorResult(skip_reason=f"registry invalid, partitions unchanged:\n{exc}")
    existing = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
    add, remove = partition_changes(set(registry.configs), existing)
    if not add and not remove:
        return dg.SensorResult(skip_reason="partitions match the registry")
    requests: list = []
    if add:
        requests.append(CONFIG_PARTITIONS.build_add_request(add))
    if remove:
        requests.append(CONFIG_PARTITIONS.build_delete_request(remove))
    context.log.info(f"registry sync: +{add} -{remove}")
    return dg.SensorResult(dynamic_partitions_requests=requests)
