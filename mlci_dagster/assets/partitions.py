"""The partition axes: config (dynamic, from the registry) × engine (static, from its root)."""

from __future__ import annotations

import dagster as dg

from mlci_dagster.registry import Registry

CONFIG_PARTITIONS = dg.DynamicPartitionsDefinition(name="config")


def lifecycle_partitions(engines: list[str]) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {"config": CONFIG_PARTITIONS, "engine": dg.StaticPartitionsDefinition(engines)}
    )


def multi_partition_key(config: str, engine: str) -> dg.MultiPartitionKey:
    """The Dagster key of one cell; its string form is the `config|engine` key."""
    return dg.MultiPartitionKey({"config": config, "engine": engine})


def partition_changes(registry: Registry, existing: set[str]) -> tuple[list[str], list[str]]:
    """The config partitions to add and to delete so that Dagster matches the registry. While
    any file is invalid (a registry loaded to keep the daemon going) none is deleted: a config
    whose file is broken keeps its partition, and its history, until it is fixed."""
    wanted = set(registry.configs)
    return sorted(wanted - existing), [] if registry.problems else sorted(existing - wanted)
