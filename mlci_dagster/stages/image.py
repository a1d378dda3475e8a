"""The image stage: a build cached by the content hash of its declared inputs, or a reference."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from mlci_dagster.images import IMAGE_DIGEST_TAG, IMAGE_REF_TAG, ImageRegistryError, current_digest
from mlci_dagster.providers.processes import run_group
from mlci_dagster.registry.models import BuildSpec
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.outcome import StageClock, StageOutcome
from mlci_dagster.vocabulary import FailureKind, Stage


def input_files(root: Path, spec: BuildSpec) -> list[Path]:
    """The files the build's inputs match; raises ValueError naming a glob that matches none."""
    files: set[Path] = set()
    for i, pattern in enumerate(spec.inputs):
        matched = [p for p in root.glob(pattern) if p.is_file()]
        if not matched:
            raise ValueError(f"image.build.inputs[{i}]: '{pattern}' matches no file under {root}")
        files.update(matched)
    return sorted(files)


def content_hash(root: Path, spec: BuildSpec) -> str:
    digest = hashlib.sha256(json.dumps(spec.command).encode())
    for path in input_files(root, spec):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def build_image(ctx: LifecycleContext) -> StageOutcome:
    clock = StageClock(Stage.IMAGE, ctx.redactor)
    spec = ctx.config.image
    if spec.ref is not None:
        # A run started for a pushed digest tests that digest, even if the tag has moved on.
        digest = ctx.run_tags.get(IMAGE_DIGEST_TAG)
        if not digest or ctx.run_tags.get(IMAGE_REF_TAG, spec.ref) != spec.ref:
            try:
                digest = current_digest(spec.ref, ctx.registry.settings.image_registries)
            except ImageRegistryError as exc:
                return clock.failed(FailureKind.INFRA, f"image {spec.ref}: could not resolve "
                                                       f"its digest: {exc}")
        return clock.passed(digest=digest, ref=spec.ref, cached=True, path="")
    assert spec.build is not None
    try:
        key = content_hash(ctx.registry.root, spec.build)
    except (OSError, ValueError) as exc:
        return clock.failed(FailureKind.INFRA, f"{ctx.loaded.path}: {exc}")
    images = ctx.home / "images"
    images.mkdir(parents=True, exist_ok=True)
    record_path, log_path = images / f"{key}.json", images / f"{key}.log"
    image_dir = images / key
    # Two partitions of one config build the same image: the second waits and reuses it.
    with open(images / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record_path.exists():
            record = json.loads(record_path.read_text())
            return clock.passed(log_ref=str(log_path), cached=True, **record)
        image_dir.mkdir(exist_ok=True)
        env = {**os.environ, "MLCI_IMAGE_DIR": str(image_dir), "MLCI_IMAGE_HASH": key}
        try:
            done = run_group(spec.build.command, cwd=ctx.registry.root, env=env,
                             timeout_s=ctx.config.timeouts.image_s, log_path=log_path,
                             redactor=ctx.redactor)
        except OSError as exc:
            return clock.failed(FailureKind.INFRA, f"image build could not start: {exc}")
        tail = done.stderr_tail or done.stdout_tail  # the whole output is in the log
        if done.timed_out:
            return clock.failed(FailureKind.TIMEOUT,
                                f"image build killed after {ctx.config.timeouts.image_s:g}s:\n"
                                f"{tail}", log_ref=str(log_path))
        if done.exit_code != 0:
            return clock.failed(FailureKind.PRODUCT,
                                f"image build exited {done.exit_code}:\n{tail}",
                                log_ref=str(log_path))
        record = {"digest": f"sha256:{key}", "ref": "", "path": str(image_dir),
                  "built_at": time.time()}
        record_path.write_text(json.dumps(record))
        return clock.passed(log_ref=str(log_path), cached=False, **record)
