"""The image stage: a reference resolved to its digest, or a build (on this machine or on AWS
CodeBuild) cached by the content hash of its declared inputs."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlci_dagster.images import ImageRegistryError, current_digest
from mlci_dagster.images.codebuild import BuildRequest, run_build
from mlci_dagster.providers.processes import run_group
from mlci_dagster.registry.models import BuildSpec, CodeBuildSpec
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.details import ImageDetails
from mlci_dagster.stages.outcome import StageClock, StageOutcome, start_failure_kind
from mlci_dagster.tiers.commits import CommitError, commit_tree
from mlci_dagster.vocabulary import FailureKind, Stage


def input_files(root: Path, spec: BuildSpec) -> list[Path]:
    """The files the build's inputs match; raises ValueError naming a glob that matches none."""
    files: set[Path] = set()
    for i, pattern in enumerate(spec.inputs or []):
        matched = [p for p in root.glob(pattern) if p.is_file()]
        if not matched:
            raise ValueError(f"image.build.inputs[{i}]: '{pattern}' matches no file under {root}")
        files.update(matched)
    return sorted(files)


def content_hash(root: Path, spec: BuildSpec, recipe: Any = None) -> str:
    """The cache key: what builds the image (`recipe`, default the command) and its inputs."""
    digest = hashlib.sha256(json.dumps(spec.command if recipe is None else recipe,
                                       sort_keys=True).encode())
    for path in input_files(root, spec):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def build_image(ctx: LifecycleContext) -> StageOutcome[ImageDetails]:
    clock = StageClock(Stage.IMAGE, ctx.redactor)
    spec = ctx.config.image
    if spec.ref is not None:
        return _resolve_ref(ctx, clock, spec.ref)
    assert spec.build is not None
    if spec.build.codebuild is not None:
        return _build_on_codebuild(ctx, clock, spec.build, spec.build.codebuild)
    sha = ctx.launch.sha
    if sha is None or ctx.registry.settings.repository is None:
        return _build_locally(ctx, clock, spec.build, ctx.registry.root)
    # A run for a commit tests that commit: its image is built from the commit's files.
    try:
        with commit_tree(ctx.registry, ctx.home, sha) as tree:
            return _build_locally(ctx, clock, spec.build, tree.root, {
                "MLCI_COMMIT": sha, "MLCI_SOURCE_DIR": str(tree.source)},
                recipe=None if tree.in_repository else [spec.build.command, sha])
    except CommitError as exc:
        return clock.failed(FailureKind.INFRA, f"image at commit {sha[:12]}: {exc}")


def _resolve_ref(ctx: LifecycleContext, clock: StageClock, ref: str) -> StageOutcome[ImageDetails]:
    # A run started for a pushed digest tests that digest, even if the tag has moved on.
    digest = ctx.launch.image_digest
    if not digest or (ctx.launch.image_ref or ref) != ref:
        try:
            digest = current_digest(ref, ctx.registry.settings.image_registries)
        except ImageRegistryError as exc:
            return clock.failed(FailureKind.INFRA, f"image {ref}: could not resolve "
                                                   f"its digest: {exc}")
    return clock.passed(ImageDetails(digest=digest, ref=ref, cached=True))


class _BuildCache:
    """What was built for one cache key, under `<home>/images/<key>.*`."""

    def __init__(self, home: Path, key: str) -> None:
        self.images = home / "images"
        self.lock_path = self.images / f"{key}.lock"
        self.record_path = self.images / f"{key}.json"
        self.log_path = self.images / f"{key}.log"
        self.image_dir = self.images / key

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any] | None]:
        """Holds the key's lock and yields its record, if built before. Two partitions of one
        config build the same image: the second waits and reuses it."""
        self.images.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield json.loads(self.record_path.read_text()) if self.record_path.exists() else None

    def store(self, record: dict[str, Any]) -> None:
        self.record_path.write_text(json.dumps(record))


def _build_locally(ctx: LifecycleContext, clock: StageClock, spec: BuildSpec, root: Path,
                   env: dict[str, str] | None = None, recipe: Any = None
                   ) -> StageOutcome[ImageDetails]:
    """The build in `root` (the registry root, or a commit's copy of it), cached by its inputs'
    content there (and `recipe`: what else decides the image)."""
    assert spec.command is not None
    try:
        key = content_hash(root, spec, recipe)
    except (OSError, ValueError) as exc:  # its inputs, as the config names them
        return clock.failed(FailureKind.CONFIG, f"{ctx.loaded.path}: {exc}")
    cache = _BuildCache(ctx.home, key)
    log_path = cache.log_path
    with cache.locked() as record:
        if record is not None:
            return clock.passed(ImageDetails(cached=True, **record), log_ref=str(log_path))
        cache.image_dir.mkdir(exist_ok=True)
        env = {**os.environ, **(env or {}), "MLCI_IMAGE_DIR": str(cache.image_dir),
               "MLCI_IMAGE_HASH": key}
        try:
            done = run_group(spec.command, cwd=root, env=env,
                             timeout_s=ctx.config.timeouts.image_s, log_path=log_path,
                             redactor=ctx.redactor)
        except OSError as exc:
            return clock.failed(start_failure_kind(exc), f"image build could not start: {exc}")
        tail = done.stderr_tail or done.stdout_tail  # the whole output is in the log
        if done.timed_out:
            return clock.failed(FailureKind.TIMEOUT,
                                f"image build killed after {ctx.config.timeouts.image_s:g}s:\n"
                                f"{tail}", log_ref=str(log_path))
        if done.exit_code != 0:
            return clock.failed(FailureKind.PRODUCT,
                                f"image build exited {done.exit_code}:\n{tail}",
                                log_ref=str(log_path))
        record = {"digest": f"sha256:{key}", "ref": "", "path": str(cache.image_dir),
                  "built_at": time.time()}
        cache.store(record)
        return clock.passed(ImageDetails(cached=False, **record), log_ref=str(log_path))


def _build_on_codebuild(ctx: LifecycleContext, clock: StageClock, spec: BuildSpec,
                        codebuild: CodeBuildSpec) -> StageOutcome[ImageDetails]:
    """One CodeBuild build, or the digest one built before for the same key when `inputs`
    are given (the codebuild block as written, its resolved source and image, the inputs)."""
    try:
        request = BuildRequest.of(codebuild)
    except ValueError as exc:
        return clock.failed(FailureKind.CONFIG, f"{ctx.loaded.path}: image.build.{exc}")
    recipe = {"codebuild": codebuild.model_dump(mode="json"),
              "source_version": request.source_version, "image": request.image}
    try:
        cache = _BuildCache(ctx.home, content_hash(ctx.registry.root, spec, recipe)) \
            if spec.inputs else None
    except (OSError, ValueError) as exc:
        return clock.failed(FailureKind.CONFIG, f"{ctx.loaded.path}: {exc}")
    with cache.locked() if cache else contextlib.nullcontext() as record:
        if record is not None:
            log_ref = record.pop("log_ref", "")
            return clock.passed(ImageDetails(cached=True, **record), log_ref=log_ref)
        report = run_build(request, ctx.config.timeouts.image_s)
        if report.failure_kind is not None:
            return clock.failed(report.failure_kind, report.summary, log_ref=report.log_ref,
                                details=ImageDetails(build_id=report.build_id,
                                                     build_status=report.status))
        record = {"digest": report.digest, "ref": request.image, "path": "",
                  "build_id": report.build_id, "built_at": time.time()}
        if cache:
            cache.store({**record, "log_ref": report.log_ref})
        return clock.passed(ImageDetails(cached=False, **record), log_ref=report.log_ref)
