"""Quarantine: partitions and tests that still run and are recorded, but do not fail a tier's
commit status or the release qualification while their quarantine lasts. Declared in the
registry's `quarantine.yaml` (beside mlci.yaml), each with its owner, reason, expiry date and
issue; `mlci quarantine add|remove` edit it. An expired quarantine counts again, and says so.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, StringConstraints, ValidationError

from mlci_dagster.registry.base import StrictModel
from mlci_dagster.registry.loader import RegistryError, _read_yaml, _validation_problems

QUARANTINE_FILE = "quarantine.yaml"
HEADER = ("# Quarantined partitions and tests: they still run and are recorded, but do not fail\n"
          "# a tier's commit status or the release qualification before `expires` (UTC).\n"
          "# `mlci quarantine add|remove` rewrite this file.\n")
Text = Annotated[str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True)]


class QuarantineEntry(StrictModel):
    """One quarantined partition (`config|engine`), or one test of it (`test`: its id as the
    test history names it)."""

    partition: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]+\|[a-z0-9-]+$")] = Field(
        description="The partition, config|engine.")
    test: Text | None = Field(default=None, description="One test of it (its id, as `mlci "
                              "tests` shows it); default: the whole partition.")
    owner: Text = Field(description="Who answers for it (and lifts it).")
    reason: Text = Field(description="Why it is quarantined.")
    expires: dt.date = Field(description="The day (UTC) from which it counts again.")
    issue: Text | None = Field(default=None, description="The issue that tracks the fix.")

    @property
    def target(self) -> str:
        return self.partition + (f" :: {self.test}" if self.test else "")

    def active(self, now: float) -> bool:
        return now < expiry_time(self.expires)

    def text(self) -> str:
        """`inject|e1 (until 2026-12-31, ml-team: flaky since the Ray upgrade)`."""
        return f"{self.target} (until {self.expires}, {self.owner}: {self.reason})"


def expiry_time(day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()


class Quarantine(StrictModel):
    """The quarantine file's content."""

    quarantine: list[QuarantineEntry] = []

    def covering(self, partition: str, failing_tests: Iterable[str] = ()
                 ) -> list[QuarantineEntry]:
        """The entries (active or not) that cover a failure of `partition` whose failing tests
        are `failing_tests` (every one, by id): the partition's own, else one per failing test
        when each has one (a failure with no test named needs the partition's)."""
        mine = [e for e in self.quarantine if e.partition == partition]
        whole = [e for e in mine if e.test is None]
        if whole:
            return whole
        tests = list(failing_tests)
        per_test = {e.test: e for e in mine if e.test is not None}
        if tests and all(t in per_test for t in tests):
            return [per_test[t] for t in dict.fromkeys(tests)]
        return []


def quarantine_path(root: Path) -> Path:
    return root / QUARANTINE_FILE


def load_quarantine(root: Path) -> Quarantine:
    """The registry's quarantine (empty without the file); RegistryError naming the file and
    field of each problem."""
    path = quarantine_path(root)
    if not path.is_file():
        return Quarantine()
    problems: list[str] = []
    raw = _read_yaml(path, problems)
    if raw is None:
        raise RegistryError(problems)
    try:
        return Quarantine.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(_validation_problems(path, exc, Quarantine)) from None


def quarantine_or_none(root: Path) -> tuple[Quarantine, str]:
    """The registry's quarantine, and "" ; or, when its file cannot be read, none (every failure
    counts: a bad file never lets one pass) and why, for the reader to say."""
    try:
        return load_quarantine(root), ""
    except RegistryError as exc:
        return Quarantine(), str(exc)


def unknown_partitions(quarantine: Quarantine, partitions: Iterable[str], path: Path
                       ) -> list[str]:
    """A problem for each entry whose partition the registry does not have."""
    known = set(partitions)
    return [f"{path}: quarantine[{i}].partition: '{e.partition}' is not a partition of the "
            f"registry (expected one of: {', '.join(sorted(known)) or 'none'})"
            for i, e in enumerate(quarantine.quarantine) if e.partition not in known]


def save_quarantine(root: Path, quarantine: Quarantine) -> Path:
    """Writes the file whole (atomically): its entries, sorted by target."""
    path = quarantine_path(root)
    entries = sorted(quarantine.quarantine, key=lambda e: e.target)
    body = {"quarantine": [e.model_dump(mode="json", exclude_none=True) for e in entries]}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(HEADER + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path
