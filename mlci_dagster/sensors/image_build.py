"""Image-build sensors: a new digest of an image → one run for every partition that tests it.

Two ways in. `image_poll` asks the registries declared under `image_registries` in mlci.yaml
which digest each watched tag points at now. `image_push` reads the `pushed_image` external
asset, which a CI build reports to the webserver with the image's ref and digest. Run keys
carry the digest, so a tick that repeats (a daemon restart, say) starts nothing twice; cursors
are JSON that Dagster stores, never state in memory.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import dagster as dg

from mlci_dagster.assets.external import PUSHED_IMAGE
from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, multi_partition_key
from mlci_dagster.event_log import latest_result_id
from mlci_dagster.images import (
    ImageRegistryClient,
    ImageRegistryError,
    parse_image_ref,
    registry_client,
)
from mlci_dagster.registry import Registry, RegistryError
from mlci_dagster.resources.mlci import MlciResource
from mlci_dagster.vocabulary import (
    IMAGE_DIGEST_TAG,
    IMAGE_REF_TAG,
    PARTITION_TAG,
    TRIGGER_TAG,
    partition_key,
)

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
PUSH_EVENTS_PER_TICK = 200


Partitions = list[tuple[str, str]]


def watched_images(registry: Registry) -> dict[str, Partitions]:
    """Each tag reference a config's `image.ref` names, with the (config, engine) cells using it."""
    watched: dict[str, Partitions] = defaultdict(list)
    for loaded in registry.configs.values():
        ref = loaded.config.image.ref
        if ref is None or "@" in ref:
            continue
        try:
            if not parse_image_ref(ref).is_tag_reference:
                continue
        except ValueError:
            continue
        watched[ref].extend((loaded.name, engine) for engine in registry.engines_for(loaded.config))
    return dict(watched)


def image_run_requests(context: dg.SensorEvaluationContext, ref: str, digest: str,
                       partitions: Partitions, known: set[str]) -> list[dg.RunRequest]:
    """One run per partition in `known` configs not yet run for `digest` (by either sensor)."""
    already = {run.tags.get(PARTITION_TAG) for run in context.instance.get_runs(
        filters=dg.RunsFilter(tags={IMAGE_DIGEST_TAG: digest}))}
    requests = []
    for config, engine in partitions:
        if config not in known:
            context.log.warning(f"{config}: not yet a partition (registry_sync adds it)")
            continue
        if partition_key(config, engine) in already:
            continue
        requests.append(dg.RunRequest(
            partition_key=multi_partition_key(config, engine),
            run_key=f"image:{digest}:{config}|{engine}",  # run keys dedupe forever
            tags={TRIGGER_TAG: "sensor", IMAGE_DIGEST_TAG: digest, IMAGE_REF_TAG: ref},
        ))
    context.log.info(f"{ref} is now {digest}: {len(requests)} run(s)")
    return requests


def results_after(context: dg.SensorEvaluationContext) -> int | dg.SensorResult:
    """The storage id of the last result a results-reading sensor has read (its cursor's
    `results_after`); on its first tick, the result that starts it after what is recorded
    already (what failed before is no news), to return as is."""
    after = json.loads(context.cursor or "{}").get("results_after")
    if after is None:
        return dg.SensorResult(
            cursor=json.dumps({"results_after": latest_result_id(context.instance)}),
            skip_reason="cursor initialised")
    return after


def registry_or_skip(mlci: MlciResource) -> Registry | dg.SkipReason:
    try:
        return mlci.registry()
    except RegistryError as exc:
        return dg.SkipReason(f"registry invalid, nothing requested:\n{exc}")


def image_poll_sensor(job: dg.UnresolvedAssetJobDefinition, minimum_interval_seconds: int = 60
                      ) -> dg.SensorDefinition:
    @dg.sensor(name="image_poll", job=job, minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Polls the declared image registries; a watched tag's new digest "
                           "starts one run per partition using it.")
    def image_poll(context: dg.SensorEvaluationContext, mlci: MlciResource
                   ) -> dg.SensorResult | dg.SkipReason:
        registry = registry_or_skip(mlci)
        if isinstance(registry, dg.SkipReason):
            return registry
        declared = registry.settings.image_registries
        if not declared:
            return dg.SkipReason("no image_registries in mlci.yaml: nothing to poll")
        watched = {ref: cells for ref, cells in watched_images(registry).items()
                   if parse_image_ref(ref).registry in declared}
        if not watched:
            return dg.SkipReason("no config's image.ref is a tag in a declared registry")
        last_seen: dict[str, str] = json.loads(context.cursor or "{}").get("digests", {})
        digests, requests, problems = {}, [], []
        clients: dict[str, ImageRegistryClient] = {}
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        for ref, partitions in sorted(watched.items()):
            image = parse_image_ref(ref)
            try:
                if image.registry not in clients:
                    clients[image.registry] = registry_client(image.registry,
                                                              declared[image.registry])
                digest = clients[image.registry].digest(image.repository, image.tag or "")
            except ImageRegistryError as exc:
                context.log.warning(str(exc))
                problems.append(str(exc))
                if ref in last_seen:
                    digests[ref] = last_seen[ref]
                continue
            digests[ref] = digest
            # The first poll of a home records the digests as they are: what the registries
            # held before is no new image, and a fresh UI starts nothing by itself.
            if context.cursor is not None and digest != last_seen.get(ref):
                requests.extend(image_run_requests(context, ref, digest, partitions, known))
        cursor = json.dumps({"digests": digests}, sort_keys=True)
        if context.cursor is None:
            return dg.SensorResult(skip_reason=f"first poll: {len(digests)} watched image "
                                   "digest(s) recorded as they are; a new one from now on runs "
                                   "the partitions that use it", cursor=cursor)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        reason = ("registries did not answer:\n" + "\n".join(problems) if problems
                  else f"no new digest among {len(watched)} watched image(s)")
        return dg.SensorResult(skip_reason=reason, cursor=cursor)

    return image_poll


def _text(metadata: dict[str, Any], key: str) -> str:
    value = metadata.get(key)
    return str(getattr(value, "value", value) or "").strip()


def image_push_sensor(job: dg.UnresolvedAssetJobDefinition, minimum_interval_seconds: int = 5
                      ) -> dg.SensorDefinition:
    @dg.sensor(name="image_push", job=job, minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Turns each pushed_image report (from a CI build) into one run per "
                           "partition whose image.ref is the pushed ref.")
    def image_push(context: dg.SensorEvaluationContext, mlci: MlciResource
                   ) -> dg.SensorResult | dg.SkipReason:
        state = json.loads(context.cursor or "{}")
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=PUSHED_IMAGE, after_storage_id=state.get("storage_id")),
            limit=PUSH_EVENTS_PER_TICK, ascending=True,
        ).records
        if not records:
            return dg.SkipReason("no new pushed_image report")
        registry = registry_or_skip(mlci)
        if isinstance(registry, dg.SkipReason):
            return registry  # the cursor stays: these reports are read again once it is valid
        watched = watched_images(registry)
        digests: dict[str, str] = state.get("digests", {})
        known = set(context.instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
        requests = []
        for record in records:
            event = record.asset_materialization
            metadata = dict(event.metadata) if event else {}
            ref, digest = _text(metadata, "image_ref"), _text(metadata, "image_digest")
            if not DIGEST.match(digest) or not ref:
                context.log.warning(f"pushed_image event {record.storage_id}: expected metadata "
                                    f"image_ref and image_digest (sha256:<64 hex>), got "
                                    f"ref={ref!r} digest={digest!r}")
                continue
            if ref not in watched:
                context.log.info(f"{ref}: no config tests this image")
                continue
            if digests.get(ref) != digest:
                digests[ref] = digest
                requests.extend(image_run_requests(context, ref, digest, watched[ref], known))
        cursor = json.dumps({"storage_id": records[-1].storage_id, "digests": digests},
                            sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        return dg.SensorResult(skip_reason=f"{len(records)} report(s), no new digest to test",
                               cursor=cursor)

    return image_push
