"""Everything a stage needs to know about the partition it runs for."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci_dagster import __version__
from mlci_dagster.common.redact import Redactor
from mlci_dagster.cost import MonthSpend
from mlci_dagster.providers.base import Provider, build_provider, provider_class
from mlci_dagster.providers.handle import SandboxHandle, render_context
from mlci_dagster.registry import LoadedConfig, Registry
from mlci_dagster.registry.models import SandboxSpec, TestConfig
from mlci_dagster.vocabulary import Launch


@dataclass
class LifecycleContext:
    registry: Registry
    loaded: LoadedConfig
    engine: str
    run_id: str
    home: Path
    provider: Provider
    redactor: Redactor
    launch: Launch = field(default_factory=Launch)
    # What the month has cost (read from the history by the Dagster layer when a budget is
    # set; None: nothing recorded) and this partition's recorded costs, for the budget check.
    month_spend: MonthSpend | None = None
    past_costs: tuple[float, ...] = ()
    # Why the run is refused before anything is created (its reservation is dirty or full),
    # decided by the caller; None to go ahead.
    refusal: str | None = None
    # The sandbox's time to live instead of its spec's (a daytime hold lives until its down).
    sandbox_ttl_s: float | None = None

    @classmethod
    def create(cls, registry: Registry, config: str, engine: str, run_id: str, home: Path,
               launch: Launch | None = None, month_spend: MonthSpend | None = None,
               past_costs: tuple[float, ...] = (), refusal: str | None = None,
               sandbox_ttl_s: float | None = None) -> LifecycleContext:
        if config not in registry.configs:
            raise KeyError(f"config '{config}' is not in the registry at {registry.root}")
        secrets = registry.secret_names
        loaded = registry.configs[config]
        spec = loaded.config.sandbox
        provider = build_provider(spec.provider, home, secrets, registry.root,
                                  provider_class(spec.provider).settings_of(spec))
        return cls(
            registry=registry, loaded=loaded, engine=engine, run_id=run_id, home=home,
            provider=provider, redactor=Redactor.from_env(secrets), launch=launch or Launch(),
            month_spend=month_spend, past_costs=past_costs, refusal=refusal,
            sandbox_ttl_s=sandbox_ttl_s,
        )

    @property
    def config(self) -> TestConfig:
        return self.loaded.config

    @property
    def sandbox_spec(self) -> SandboxSpec:
        """The config's sandbox with its engine's part (a database, say) started first."""
        engine = self.registry.settings.engines[self.engine]
        sandbox = self.config.sandbox
        if self.sandbox_ttl_s is not None:
            sandbox = sandbox.model_copy(update={"ttl_s": self.sandbox_ttl_s})
        return sandbox.with_engine(engine)

    def render_context(self, handle: SandboxHandle, image: dict[str, Any], **extra: Any
                       ) -> dict[str, Any]:
        return render_context(handle, dict(os.environ), image=image, **extra)


# The installed package's own folder: what the harness is, however it was installed.
PACKAGE_DIR = Path(__file__).resolve().parent.parent


@functools.cache
def code_version(package_dir: Path = PACKAGE_DIR) -> str:
    """The harness's version: `__version__` plus a short hash of the package's own source
    (`**/*.py` under `package_dir`, by sorted relative path), computed once per process. It
    changes exactly when the harness code does, installed editable, from a wheel or in an
    image, and never with the repository that holds the registry."""
    digest = hashlib.sha256()
    for relative in sorted(p.relative_to(package_dir).as_posix()
                           for p in package_dir.rglob("*.py")):
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256((package_dir / relative).read_bytes()).digest())
    return f"{__version__}+{digest.hexdigest()[:12]}"
