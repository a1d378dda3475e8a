"""Keeps the dynamic `config` partitions equal to the registry's configs (adds and removes), and
says in the `registry_valid` check which file and field is wrong while one is.

A config whose file is invalid keeps its partition (it is not run until fixed: the lifecycle
refuses it, naming the problem); while any file is invalid no partition is removed.
"""

import hashlib

import dagster as dg

from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, partition_changes
from mlci_dagster.assets.registry import validity
from mlci_dagster.registry import RegistryError
from mlci_dagster.resources.mlci import MlciResource


@dg.sensor(
    name="registry_sync", minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a config partition for each new registry file and removes deleted ones; "
                "its registry_valid check names every invalid file and field.",
)
def registry_sync(context: dg.SensorEvaluationContext, mlci: MlciResource) -> dg.SensorResult:
    try:
        registry = mlci.registry()
    except RegistryError as exc:  # no valid mlci.yaml seen yet: nothing to sync against
        return dg.SensorResult(skip_reason=f"registry invalid, partitions unchanged:\n{exc}")
    # The check is evaluated when what it would say changes: not at every tick.
    said = hashlib.sha256("\n".join(registry.problems).encode()).hexdigest()[:16]
    events = [validity(registry)] if said != context.cursor else []
    existing = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
    add, remove = partition_changes(registry, existing)
    requests: list = []
    if add:
        requests.append(CONFIG_PARTITIONS.build_add_request(add))
    if remove:
        requests.append(CONFIG_PARTITIONS.build_delete_request(remove))
    if add or remove:
        context.log.info(f"registry sync: +{add} -{remove}")
    skip = None if add or remove else "partitions match the registry" if not registry.problems \
        else "registry invalid, partitions unchanged:\n" + "\n".join(registry.problems)
    return dg.SensorResult(dynamic_partitions_requests=requests, asset_events=events,
                           cursor=said, skip_reason=skip)
