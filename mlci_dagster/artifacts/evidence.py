"""What of a run goes to the artifact store, after its teardown: every stage's log, the debug
bundle, the browser checks' screenshots (unless turned off) and the test reports, each under
`<config>/<engine>/<run id>/<kind>/<file name>`. They are uploaded as they are on disk, where
they were written redacted. An upload that fails is named, never fatal to the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mlci_dagster.artifacts.store import ArtifactStore, StoreError, put
from mlci_dagster.history.record import ArtifactRecord, PendingArtifact
from mlci_dagster.registry.models import ArtifactSettings
from mlci_dagster.stages.debug_bundle import screenshots_of
from mlci_dagster.stages.outcome import StageOutcome
from mlci_dagster.vocabulary import Stage, split_partition_key

MIB = 1024 * 1024


def evidence(outcomes: list[StageOutcome]) -> Iterator[tuple[str, Path]]:
    """(kind, file) of every piece of the run's evidence on disk, each once: the test reports,
    the screenshots (those allowed to travel), the debug bundle, and as logs every other file
    of the sandbox's log directory and each stage's own log."""
    by_stage = {o.stage: o for o in outcomes}
    shots = {Path(p) for p in screenshots_of(outcomes)}
    travelling = {Path(p) for p in screenshots_of(outcomes, travelling=True)}
    pipelines, sandbox = by_stage.get(Stage.PIPELINE_RUNS), by_stage.get(Stage.SANDBOX)
    reports = {Path(t.report) for t in pipelines.details.tests.values() if t.report} \
        if pipelines else set()
    teardown = by_stage.get(Stage.TEARDOWN)
    handle = sandbox.details.handle if sandbox else None
    files = sorted(Path(handle.log_dir).rglob("*")) if handle and handle.log_dir else []
    files += [Path(o.log_ref) for o in outcomes if o.log_ref]
    files += [*reports, *([Path(teardown.details.debug_bundle)]
                          if teardown and teardown.details.debug_bundle else [])]
    seen: set[Path] = set()
    for file in files:
        if file in seen or not file.is_file():
            continue
        seen.add(file)
        kind = ("screenshot" if file in shots else "report" if file in reports
                else "bundle" if teardown and str(file) == teardown.details.debug_bundle
                else "log")
        if kind != "screenshot" or file in travelling:
            yield kind, file


def planned(partition: str, run_id: str, outcomes: list[StageOutcome]
            ) -> list[PendingArtifact]:
    """Each piece of the run's evidence with the key it is to have, none uploaded yet."""
    config, engine = split_partition_key(partition)
    return [PendingArtifact(kind=kind, path=str(path), key=f"{config}/{engine}/{run_id}/{kind}/"
                            f"{path.name}", why="not uploaded yet")
            for kind, path in evidence(outcomes)]


def upload(store: ArtifactStore, settings: ArtifactSettings, pieces: list[PendingArtifact]
           ) -> tuple[dict[str, ArtifactRecord], list[PendingArtifact]]:
    """Uploads `pieces`: (local path -> what was stored, each not stored with why). Once the
    store fails, the rest are not tried: a store down costs one attempt's time, not one per
    file."""
    stored, pending = {}, []
    down: StoreError | None = None
    for piece in pieces:
        if down is not None:
            pending.append(piece.model_copy(update={"why": f"not tried, the store failed: "
                                                           f"{down}"}))
            continue
        try:
            done = put(store, piece.key, Path(piece.path), int(settings.max_mb * MIB))
        except StoreError as exc:
            pending.append(piece.model_copy(update={"why": str(exc)}))
            down = exc if exc.store else None
            continue
        stored[piece.path] = ArtifactRecord(kind=piece.kind, key=done.key, size=done.size,
                                            sha256=done.sha256, truncated=done.truncated,
                                            url=done.url)
    return stored, pending
