"""Loads a registry folder whole or not at all: each error names the file, field and expectation."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from mlci_dagster.chromium import INSTALL_HINT, find_chromium
from mlci_dagster.registry.models import Settings, TestConfig
from mlci_dagster.registry.references import (
    engine_reference_problems,
    location_text,
    reference_problems,
)
from mlci_dagster.registry.reservations import reservation_problems
from mlci_dagster.templating import iter_references

SETTINGS_FILE = "mlci.yaml"
# libyaml's parser where PyYAML has it: a tenth of the time on a registry of hundreds of files.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CONFIGS_DIR = "configs"


class RegistryError(ValueError):
    """One or more registry problems, each `file: field.path: what was expected`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class LoadedConfig:
    config: TestConfig
    path: Path
    config_id: str

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Registry:
    root: Path
    settings: Settings
    configs: dict[str, LoadedConfig]
    # What this machine lacks for some checks (they fail as infra here), each naming the file
    # and field: the registry is valid, the machine is not ready for all of it.
    warnings: tuple[str, ...] = ()

    @property
    def engines(self) -> list[str]:
        return list(self.settings.engines)

    @functools.cached_property
    def secret_names(self) -> tuple[str, ...]:
        """The environment variables whose values every Redactor masks: those listed under
        `secrets`, and every one the registry references as `${env.NAME}` (in a config, an
        engine's variables or services) unless listed under `public_env`. Variables whose
        names look like credentials are masked too: Redactor.from_env adds them itself."""
        documents: list[Any] = [self.settings.model_dump(mode="json", include={"engines"})]
        documents += [c.config.model_dump(mode="json", by_alias=True)
                      for c in self.configs.values()]
        referenced = {name for ref in iter_references(documents)
                      if ref.startswith("env.") and (name := ref.split(".")[1])}
        public = set(self.settings.public_env)
        return tuple(sorted(set(self.settings.secrets) | (referenced - public)))

    def engines_for(self, config: TestConfig) -> list[str]:
        return config.engines if config.engines is not None else self.engines

    def partition_problem(self, config: str, engine: str) -> str:
        """Why (config, engine) is no partition of this registry; "" when it is one. A key
        typed into the UI, or left from a config since removed, is refused with this."""
        if config not in self.configs:
            return (f"config '{config}' is not in the registry at {self.root} (known: "
                    f"{', '.join(sorted(self.configs)) or 'none'})")
        engines = self.engines_for(self.configs[config].config)
        if engine not in engines:
            return (f"engine '{engine}' does not apply to config '{config}' (expected one of: "
                    f"{', '.join(engines)})")
        return ""

    def partitions(
        self, config: str | None = None, engine: str | None = None, tier: str | None = None
    ) -> list[tuple[str, str]]:
        """Every applicable (config, engine), optionally narrowed."""
        return [
            (loaded.name, eng)
            for loaded in self.configs.values()
            if config in (None, loaded.name) and (tier is None or tier in loaded.config.tiers)
            for eng in self.engines_for(loaded.config)
            if engine in (None, eng)
        ]


# Say when a config runs and as what, not what it tests; left out, ids from before they existed
# are kept.
OUTSIDE_CONFIG_ID = {"paths", "class_"}


# Fields added after ids existed, left out while unset, so a harness upgrade keeps every id.
UNSET_OUTSIDE_CONFIG_ID = (("sandbox", "reservation"),)


def config_id(config: TestConfig) -> str:
    """A stable hash of the config's canonical content: a changed test is a new id."""
    content = config.model_dump(mode="json", by_alias=True, exclude=OUTSIDE_CONFIG_ID)
    for section, name in UNSET_OUTSIDE_CONFIG_ID:
        if content[section].get(name) is None:
            content[section].pop(name, None)
    canonical = json.dumps(content, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _field_path(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`pipelines[1].timeout_s`: the location as the YAML writes it, without the union tags
    pydantic inserts (`command`, `kubernetes`, ...)."""
    _, tags = _walk(model, loc)
    return location_text(part for i, part in enumerate(loc) if i not in tags) or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc` (a pydantic error location) inside
    `model`, or None if it is no model."""
    kind, _ = _walk(model, loc)
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, set[int]]:
    """Follows `loc` through fields, list items and dict values; a discriminated union takes the
    member its tag (the next part of the location) chose. Returns the type reached (None if the
    location leaves the models) and the positions of the tags."""
    kind: Any = model
    tags: set[int] = set()
    i = 0
    while True:
        origin, args = get_origin(kind), get_args(kind)
        if origin is Annotated:
            kind = args[0]
        elif origin in (Union, types.UnionType):
            members = [get_args(a)[0] if get_origin(a) is Annotated else a
                       for a in args if a is not type(None)]
            if len(members) == 1:
                kind = members[0]
                continue
            chosen = [m for m in members if i < len(loc) and _tagged(m, loc[i])]
            if len(chosen) != 1:
                return None, tags
            kind = chosen[0]
            tags.add(i)
            i += 1
        elif i == len(loc):
            return kind, tags
        elif origin is list and isinstance(loc[i], int):
            kind, i = args[0], i + 1
        elif origin is dict:
            kind, i = args[1], i + 1
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            fields = {f.alias or n: f for n, f in kind.model_fields.items()}
            if loc[i] not in fields:
                return None, tags
            kind, i = fields[loc[i]].annotation, i + 1
        else:
            return None, tags


def _tagged(member: Any, tag: Any) -> bool:
    """Whether a union member's `Literal` discriminator field (optional or not) takes the
    value `tag`."""
    return isinstance(member, type) and issubclass(member, BaseModel) and any(
        tag in _literal_values(f.annotation) for f in member.model_fields.values())


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(v for arg in get_args(annotation) for v in _literal_values(arg))
    return ()


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`unknown key 'x'`, with the nearest known key at that place, or every known key."""
    key = str(loc[-1])
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return f"unknown key '{key}'"
    known = sorted(f.alias or n for n, f in parent.model_fields.items())
    nearest = difflib.get_close_matches(key, known, n=1)
    if nearest:
        return f"unknown key '{key}' (did you mean '{nearest[0]}'?)"
    return f"unknown key '{key}' (expected one of: {', '.join(known)})"


def _validation_problems(path: Path, error: ValidationError, model: type[BaseModel]
                         ) -> list[str]:
    problems = []
    for err in error.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = _unknown_key(model, err["loc"])
        if err["type"] == "provider":  # the sandbox union's tag names no provider
            err["loc"] = (*err["loc"], "provider")
            message = f"unknown provider {err['input'].get('provider')!r} ({err['msg']})"
        if err["loc"]:
            problems.append(f"{path}: {_field_path(model, err['loc'])}: {message}")
        else:  # a whole-config rule, whose message starts with the field path it is about
            problems.append(f"{path}: {message}")
    return problems


def _read_yaml(path: Path, problems: list[str]) -> Any:
    try:
        data = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {exc}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: (top level): expected a mapping, got {type(data).__name__}")
        return None
    return data


def _tier_problems(path: Path, config: TestConfig, settings: Settings) -> list[str]:
    """Tiers the config names that mlci.yaml does not declare. When it declares none, tiers are
    free labels, as they were before they could be declared."""
    declared = settings.tiers
    if not declared:
        return []
    expected = f"expected tiers declared in {SETTINGS_FILE}: {', '.join(declared)}"
    if "tiers" not in config.model_fields_set:
        undeclared = [t for t in config.tiers if t not in declared]
        return [f"{path}: tiers: not given, and the default tier '{t}' is not declared "
                f"({expected})" for t in undeclared]
    return [f"{path}: tiers[{i}]: unknown tier '{t}' ({expected})"
            for i, t in enumerate(config.tiers) if t not in declared]


def _binding_problems(path: Path, config: TestConfig, settings: Settings) -> list[str]:
    """A reservation the config binds to that mlci.yaml does not declare, or on another
    provider."""
    name = config.sandbox.reservation
    if name is None:
        return []
    declared = {r.name: r for r in settings.reservations}
    if name not in declared:
        return [f"{path}: sandbox.reservation: unknown reservation '{name}' (expected one of: "
                f"{', '.join(declared) or f'none declared in {SETTINGS_FILE}'})"]
    if declared[name].provider != config.sandbox.provider:
        return [f"{path}: sandbox.reservation: '{name}' reserves '{declared[name].provider}' "
                f"capacity (sandbox.provider is '{config.sandbox.provider}'; expected the same)"]
    return []


def _intent_problems(path: Path, settings: Settings, configs: dict[str, LoadedConfig]
                     ) -> list[str]:
    """A daytime intent must name a config bound to its reservation, on an engine it has."""
    problems = []
    for i, reservation in enumerate(settings.reservations):
        daytime = reservation.daytime
        if daytime is None:
            continue
        field = f"reservations[{i}].daytime.intent"
        loaded = configs.get(daytime.config)
        if loaded is None:
            problems.append(f"{path}: {field}: unknown config '{daytime.config}' (expected one "
                            f"of: {', '.join(sorted(configs)) or 'none'})")
            continue
        if loaded.config.sandbox.reservation != reservation.name:
            problems.append(f"{path}: {field}: config '{daytime.config}' is not bound to "
                            f"reservation '{reservation.name}' (expected sandbox.reservation: "
                            f"{reservation.name} in {loaded.path.name})")
        engines = loaded.config.engines or list(settings.engines)
        if daytime.engine is not None and daytime.engine not in engines:
            problems.append(f"{path}: {field}: engine '{daytime.engine}' does not apply to "
                            f"'{daytime.config}' (expected one of: {', '.join(engines)})")
    return problems


def _unrated_resources(path: Path, config: TestConfig, settings: Settings) -> list[str]:
    """Billed resources without a rate, once rates or a budget are declared: a cost that would
    silently count as unknown, or a budget that could not be kept."""
    rates = settings.costs.hourly_usd
    if not rates and settings.budget is None:
        return []  # costs not tracked: cost_usd stays unknown
    return [f"{path}: {resource.field}: no rate for '{resource.type}' under costs.hourly_usd "
            f"in {SETTINGS_FILE} (expected one: "
            f"{'a budget is set' if settings.budget else 'costs are tracked'}; known: "
            f"{', '.join(sorted(rates)) or 'none'})"
            for resource in config.sandbox.billed_resources() if resource.type not in rates]


def _missing_files(path: Path, config: TestConfig, root: Path) -> list[str]:
    """Manifests the config names that are not files under the registry root, and a cluster
    CLI that is not on this machine."""
    named = [(f"sandbox.manifests[{i}]", m)
             for i, m in enumerate(getattr(config.sandbox, "manifests", []))]
    named += [(f"pipelines[{i}].manifest", p.manifest) for i, p in enumerate(config.pipelines)
              if hasattr(p, "manifest")]
    problems = [f"{path}: {field}: file '{name}' not found under the registry root {root}"
                for field, name in named if not (root / name).is_file()]
    create = getattr(getattr(config.sandbox, "cluster", None), "create", None)
    if create and shutil.which(create) is None:
        problems.append(f"{path}: sandbox.cluster.create: '{create}' is not installed on this "
                        "machine (expected on PATH, to create the cluster for each run)")
    return problems


def _machine_warnings(configs: dict[str, LoadedConfig]) -> list[str]:
    """Browser checks on a machine without Chromium."""
    browsers = [(loaded.path, i) for loaded in configs.values()
                for i, route in enumerate(loaded.config.ui_smoke.routes)
                if route.kind == "browser"]
    if not browsers or find_chromium() is not None:
        return []
    return [f"{path}: ui_smoke.routes[{i}]: kind 'browser' needs Chromium, which this machine "
            f"does not have ({INSTALL_HINT}); the check fails as infra here"
            for path, i in browsers]


def _signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of every registry file, read in one directory scan each."""
    entries = []
    for directory, accept in ((root, lambda n: n == SETTINGS_FILE),
                              (root / CONFIGS_DIR, lambda n: n.endswith((".yaml", ".yml")))):
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as scan:
            for entry in scan:
                if accept(entry.name):
                    stat = entry.stat()
                    entries.append((entry.path, stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(entries))


# root as given -> (when its files were last looked at, their signature, the parsed registry)
_cache: dict[str, tuple[float, tuple[tuple[str, int, int], ...], Registry]] = {}
RECHECK_S = 2.0


def load_registry_cached(root: str | Path) -> Registry:
    """load_registry, parsed again only when a registry file changed. Every stage, and the
    tags of every run request, ask for it: the files are looked at no more than every 2 s."""
    now = time.monotonic()
    entry = _cache.get(str(root))
    if entry is not None and now - entry[0] <= RECHECK_S:
        return entry[2]
    resolved = Path(root).resolve()
    signature = _signature(resolved)
    registry = entry[2] if entry is not None and entry[1] == signature else load_registry(resolved)
    _cache[str(root)] = (now, signature, registry)
    return registry


def load_registry(root: str | Path) -> Registry:
    """Parses and validates the whole registry; raises RegistryError listing every problem."""
    root = Path(root).resolve()
    problems: list[str] = []
    settings_path = root / SETTINGS_FILE
    if not settings_path.is_file():
        raise RegistryError([f"{settings_path}: missing (the registry's root settings file)"])
    settings = None
    raw = _read_yaml(settings_path, problems)
    if raw is not None:
        try:
            settings = Settings.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_validation_problems(settings_path, exc, Settings))
    paths = sorted((root / CONFIGS_DIR).glob("*.y*ml"))
    if not paths:
        problems.append(f"{root / CONFIGS_DIR}: no config files (*.yaml) found")
    configs: dict[str, LoadedConfig] = {}
    for path in paths:
        raw = _read_yaml(path, problems)
        if raw is None:
            continue
        try:
            config = TestConfig.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_validation_problems(path, exc, TestConfig))
            continue
        if config.name in configs:
            problems.append(f"{path}: name: duplicate config name '{config.name}' "
                            f"(also in {configs[config.name].path})")
            continue
        if settings is not None:
            for i, engine in enumerate(config.engines or []):
                if engine not in settings.engines:
                    problems.append(f"{path}: engines[{i}]: unknown engine '{engine}' "
                                    f"(expected one of: {', '.join(settings.engines)})")
            problems.extend(reference_problems(path, config, settings, root, settings_path))
            problems.extend(_tier_problems(path, config, settings))
            pool = config.sandbox.pool
            if pool is not None and pool not in settings.pools:
                problems.append(f"{path}: sandbox.pool: unknown pool '{pool}' (expected one of: "
                                f"{', '.join(settings.pools) or 'none declared in mlci.yaml'})")
            problems.extend(_binding_problems(path, config, settings))
            problems.extend(_unrated_resources(path, config, settings))
        problems.extend(_missing_files(path, config, root))
        configs[config.name] = LoadedConfig(config, path, config_id(config))
    if settings is not None:
        problems.extend(f"{settings_path}: {problem}" for problem in reservation_problems(
            settings.reservations, set(settings.pools), settings.nightly, time.time()))
        problems.extend(_intent_problems(settings_path, settings, configs))
        problems.extend(engine_reference_problems(
            settings_path, settings, [loaded.config for loaded in configs.values()]))
    if problems or settings is None:
        # An engine's manifest is checked with every config that applies it, and a string
        # may hold a reference twice: each problem is said once.
        raise RegistryError(list(dict.fromkeys(problems)))
    return Registry(root, settings, configs, tuple(_machine_warnings(configs)))
