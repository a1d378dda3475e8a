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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from mlci_dagster.common.chromium import INSTALL_HINT, find_chromium
from mlci_dagster.common.templating import iter_references
from mlci_dagster.registry.models import Settings, TestConfig
from mlci_dagster.registry.references import (
    engine_reference_problems,
    location_text,
    reference_problems,
)
from mlci_dagster.registry.reservations import reservation_problems
from mlci_dagster.vocabulary import partition_key

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
    # Only on a registry loaded to keep the daemon going (load_usable_registry): every problem
    # of the files, and the configs left out for them by name (each with its own problems).
    problems: tuple[str, ...] = ()
    invalid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The last valid version of each config left out, known to this process: its sandboxes are
    # still swept by the janitor; it is never run.
    held_over: dict[str, LoadedConfig] = field(default_factory=dict)
    # Set when mlci.yaml itself is invalid and the last valid one is used in its place.
    settings_from: str = ""

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
        typed into the UI, left from a config since removed, or of a config whose file is
        invalid now, is refused with this."""
        if config in self.invalid:
            return f"config '{config}' is invalid: " + "; ".join(self.invalid[config])
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

    def partition_keys(self) -> list[str]:
        """Every applicable `config|engine` key."""
        return [partition_key(config, engine) for config, engine in self.partitions()]

    def unknown_key(self, key: str) -> str:
        """`<key>: not a partition of the registry (expected one of: ...)`, for a key typed by
        hand (a command's argument, a job's config); "" when it is one."""
        known = self.partition_keys()
        return "" if key in known else (f"{key}: not a partition of the registry (expected one "
                                         f"of: {', '.join(known) or 'none'})")


# Say when a config runs and as what, not what it tests; left out, ids from before they existed
# are kept.
OUTSIDE_CONFIG_ID = {"paths", "class_", "reruns"}


# Fields added after ids existed, left out while unset (None, or empty), so a harness upgrade
# keeps every id: (section, field); a section ending in `[]` is a list, each item's field.
UNSET_OUTSIDE_CONFIG_ID = (("sandbox", "reservation"), ("pipelines[]", "reports"))


def config_id(config: TestConfig) -> str:
    """A stable hash of the config's canonical content: a changed test is a new id."""
    content = config.model_dump(mode="json", by_alias=True, exclude=OUTSIDE_CONFIG_ID)
    for section, name in UNSET_OUTSIDE_CONFIG_ID:
        items = content[section.removesuffix("[]")]
        for item in items if section.endswith("[]") else [items]:
            if item.get(name) in (None, []):
                item.pop(name, None)
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


def _read_yaml(path: Path, problems: list[str], text: str | None = None) -> Any:
    """The mapping in `path` (or `text`, read from it before); a problem when there is none."""
    try:
        data = yaml.load(path.read_text() if text is None else text, Loader=SAFE_LOADER)
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
    problems = [f"{path}: {field}: file '{name}' not found under the registry root {root}"
                for field, name in config.named_files() if not (root / name).is_file()]
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


@dataclass
class _Parsed:
    """Every file of a registry folder, parsed and checked, with each problem kept beside the
    config file it is about (the rest are the root settings' or the folder's)."""

    settings: Settings | None
    configs: dict[str, LoadedConfig]  # every config that parsed, valid or not
    config_problems: dict[Path, list[str]]
    names: dict[Path, str]  # a config file's `name`, where it could be read
    problems: list[str]  # mlci.yaml's, the folder's, and rules across files

    def all_problems(self) -> list[str]:
        # An engine's manifest is checked with every config that applies it, and a string may
        # hold a reference twice: each problem is said once.
        found = [*self.problems, *(p for ps in self.config_problems.values() for p in ps)]
        return list(dict.fromkeys(found))


def _parse(root: Path, settings_text: str | None = None) -> _Parsed:
    """`settings_text`: mlci.yaml's text to use instead of the file (the last valid one)."""
    problems: list[str] = []
    settings_path = root / SETTINGS_FILE
    settings = None
    raw = None
    if settings_text is None and not settings_path.is_file():
        problems.append(f"{settings_path}: missing (the registry's root settings file)")
    else:
        raw = _read_yaml(settings_path, problems, settings_text)
    if raw is not None:
        try:
            settings = Settings.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_validation_problems(settings_path, exc, Settings))
    paths = sorted((root / CONFIGS_DIR).glob("*.y*ml"))
    if not paths:
        problems.append(f"{root / CONFIGS_DIR}: no config files (*.yaml) found")
    parsed = _Parsed(settings, {}, {}, {}, problems)
    for path in paths:
        mine = parsed.config_problems.setdefault(path, [])
        raw = _read_yaml(path, mine)
        if raw is None:
            continue
        if isinstance(raw.get("name"), str):
            parsed.names[path] = raw["name"]
        try:
            config = TestConfig.model_validate(raw)
        except ValidationError as exc:
            mine.extend(_validation_problems(path, exc, TestConfig))
            continue
        if config.name in parsed.configs:
            mine.append(f"{path}: name: duplicate config name '{config.name}' "
                        f"(also in {parsed.configs[config.name].path})")
            continue
        if settings is not None:
            mine.extend(_config_problems(path, config, settings, root))
        mine.extend(_missing_files(path, config, root))
        parsed.configs[config.name] = LoadedConfig(config, path, config_id(config))
    if settings is not None:
        problems.extend(_across_files(root, settings, parsed.configs))
    return parsed


def _config_problems(path: Path, config: TestConfig, settings: Settings, root: Path
                     ) -> list[str]:
    """A config's problems against the root settings: engines, references, tiers, its pool,
    its reservation, its billed resources."""
    problems = [f"{path}: engines[{i}]: unknown engine '{engine}' (expected one of: "
                f"{', '.join(settings.engines)})"
                for i, engine in enumerate(config.engines or []) if engine not in settings.engines]
    problems.extend(reference_problems(path, config, settings, root, root / SETTINGS_FILE))
    problems.extend(_tier_problems(path, config, settings))
    pool = config.sandbox.pool
    if pool is not None and pool not in settings.pools:
        problems.append(f"{path}: sandbox.pool: unknown pool '{pool}' (expected one of: "
                        f"{', '.join(settings.pools) or 'none declared in mlci.yaml'})")
    problems.extend(_binding_problems(path, config, settings))
    problems.extend(_unrated_resources(path, config, settings))
    return problems


def _across_files(root: Path, settings: Settings, configs: dict[str, LoadedConfig]
                  ) -> list[str]:
    """The rules that read mlci.yaml with the configs: reservations, their intents, the strings
    of engines."""
    settings_path = root / SETTINGS_FILE
    return [*(f"{settings_path}: {problem}" for problem in reservation_problems(
                settings.reservations, set(settings.pools), settings.nightly, time.time())),
            *_intent_problems(settings_path, settings, configs),
            *engine_reference_problems(settings_path, settings,
                                       [loaded.config for loaded in configs.values()])]


def load_registry(root: str | Path) -> Registry:
    """Parses and validates the whole registry; raises RegistryError listing every problem.
    What `mlci` uses: nothing is registered or run while any problem remains."""
    root = Path(root).resolve()
    if not (root / SETTINGS_FILE).is_file():  # not a registry at all: said alone
        raise RegistryError([f"{root / SETTINGS_FILE}: missing (the registry's root settings "
                             "file)"])
    parsed = _parse(root)
    problems = parsed.all_problems()
    if problems or parsed.settings is None:
        raise RegistryError(problems)
    return Registry(root, parsed.settings, parsed.configs,
                    tuple(_machine_warnings(parsed.configs)))


def load_usable_registry(root: str | Path, previous: Registry | None = None,
                         snapshot: Path | None = None) -> Registry:
    """The registry as far as it is valid, for the daemon and the UI, which must keep going (the
    janitor, the cleanup sensors, the other configs' runs) while a file is being fixed.

    A config file with a problem is left out, named in `invalid` with its problems, and its last
    valid version (from `previous`) kept in `held_over` for the janitor. When mlci.yaml itself,
    or a rule across files, is invalid, the last valid mlci.yaml stands in: `previous`'s, else
    the copy in `snapshot`, which every fully valid load writes. Raises RegistryError only when
    no valid mlci.yaml was ever seen."""
    root = Path(root).resolve()
    parsed = _parse(root)
    problems = parsed.all_problems()
    if not problems and parsed.settings is not None:
        _write_snapshot(snapshot, root)
        return Registry(root, parsed.settings, parsed.configs,
                        tuple(_machine_warnings(parsed.configs)))
    settings_from = ""
    if parsed.problems:  # mlci.yaml's own, or a rule across files
        settings, settings_from = _last_valid_settings(root, previous, snapshot)
        if settings is None:
            raise RegistryError(problems)
        parsed = _checked_against(root, settings, parsed)
    configs = {name: loaded for name, loaded in parsed.configs.items()
               if not parsed.config_problems.get(loaded.path)}
    invalid = {name: tuple(found) for path, found in parsed.config_problems.items()
               if found and (name := parsed.names.get(path, path.stem)) not in configs}
    held_over = {name: previous.configs[name] for name in invalid
                 if previous is not None and name in previous.configs}
    assert parsed.settings is not None
    return Registry(root, parsed.settings, configs, tuple(_machine_warnings(configs)),
                    problems=tuple(problems), invalid=invalid, held_over=held_over,
                    settings_from=settings_from)


def _last_valid_settings(root: Path, previous: Registry | None, snapshot: Path | None
                         ) -> tuple[Settings | None, str]:
    if previous is not None:
        return previous.settings, "the last valid mlci.yaml this process loaded"
    text = _read_snapshot(snapshot)
    if text is None:
        return None, ""
    return _parse(root, settings_text=text).settings, f"the last valid mlci.yaml ({snapshot})"


def _checked_against(root: Path, settings: Settings, parsed: _Parsed) -> _Parsed:
    """The configs checked again against `settings` (the last valid root settings), each
    problem beside its file; the rules across files, failing, leave every config out."""
    again = _Parsed(settings, {}, {}, dict(parsed.names), [])
    for path, found in parsed.config_problems.items():
        loaded = next((c for c in parsed.configs.values() if c.path == path), None)
        if loaded is None:  # it did not parse: its problems stand
            again.config_problems[path] = found
            continue
        again.config_problems[path] = [*_config_problems(path, loaded.config, settings, root),
                                       *_missing_files(path, loaded.config, root)]
        again.configs[loaded.name] = loaded
    across = _across_files(root, settings, again.configs)
    for path in again.config_problems if across else ():
        again.config_problems[path] = [*again.config_problems[path], *across]
    return again


def _write_snapshot(snapshot: Path | None, root: Path) -> None:
    if snapshot is None:
        return
    with contextlib.suppress(OSError):  # a read-only home keeps no copy: only this process's
        text = (root / SETTINGS_FILE).read_text()
        if not snapshot.is_file() or snapshot.read_text() != text:
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            tmp = snapshot.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(snapshot)


def _read_snapshot(snapshot: Path | None) -> str | None:
    try:
        return snapshot.read_text() if snapshot is not None else None
    except OSError:
        return None


def snapshot_path(root: Path) -> Path | None:
    """Where the last valid mlci.yaml of `root` is kept: under $DAGSTER_HOME/mlci, a file per
    registry folder; None without a DAGSTER_HOME."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return None
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(home) / "mlci" / "registry" / f"{tag}.{SETTINGS_FILE}"


# root as given -> (when its files were last looked at, their signature, the registry)
_cache: dict[str, tuple[float, tuple[tuple[str, int, int], ...], Registry]] = {}
RECHECK_S = 2.0


def load_registry_cached(root: str | Path) -> Registry:
    """load_usable_registry, parsed again only when a registry file changed, the registry it
    loaded last standing in for what is invalid now. What the daemon, the UI and every run use:
    every stage, and the tags of every run request, ask for it, so the files are looked at no
    more than every 2 s."""
    now = time.monotonic()
    entry = _cache.get(str(root))
    if entry is not None and now - entry[0] <= RECHECK_S:
        return entry[2]
    resolved = Path(root).resolve()
    signature = _signature(resolved)
    if entry is not None and entry[1] == signature:
        registry = entry[2]
    else:
        registry = load_usable_registry(resolved, entry[2] if entry else None,
                                        snapshot_path(resolved))
    _cache[str(root)] = (now, signature, registry)
    return registry
