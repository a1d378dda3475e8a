"""References that can never resolve: a `${...}` in a config, an engine or a manifest checked
against what its field is rendered with (templating.PROVIDES, narrowed to the names the registry
declares), and names of services and outputs that other fields point at."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mlci_dagster.common.templating import (
    IMAGE_ATTRIBUTES,
    KIND_OUTPUTS,
    PROVIDES,
    REFERENCE,
    ROOTS,
)
from mlci_dagster.registry.models import ServiceSpec, Settings, TestConfig

# Roots that exist only in some fields, and where (see every call of `render`).
ONLY_IN = {
    "port": "is only in a local service's own definition (its command, env and ready.command)",
    "id": "is only in a submit_poll pipeline's poll_url and logs_url",
    "outputs": "is only in pipelines (the outputs of those before) and ui_smoke",
}
BEFORE_IMAGE = "does not exist before the image is built (only ${env.NAME} does)"
BEFORE_VARIABLES = "does not exist here (engine variables are rendered before any is set)"
POLLED_FIELDS = ("poll_url", "logs_url")


def location_text(location: Iterable[Any]) -> str:
    """`pipelines[0].command[2]`: a location as the YAML writes it."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@dataclass(frozen=True)
class Scope:
    """One step of a reference: the names that may come next, each with the scope after it
    (None: a value, nothing may follow); `absent` names exist, but not here (each with why);
    with `any_name` every name may come (the environment, known only at run time)."""

    noun: str
    members: dict[str, Scope | None]
    absent: dict[str, str] = field(default_factory=dict)
    any_name: bool = False

    def problem(self, reference: str) -> str | None:
        """Why `${reference}` can never resolve here, or None if it can."""
        parts = reference.split(".")
        node: Scope | None = self
        for depth, part in enumerate(parts):
            walked = ".".join(parts[:depth])
            if node is None:
                return (f"too deep: '{walked}' is a value, without attribute '{part}' "
                        f"(expected ${{{walked}}})")
            of = f" of '{walked}'" if walked else ""
            if part in node.absent:
                return f"{node.noun} '{part}'{of} {node.absent[part]}"
            if part not in node.members and not node.any_name:
                return f"unknown {node.noun} '{part}'{of} ({node.hint(part)})"
            node = node.members.get(part)
        if node is not None:
            known = ", ".join(sorted(node.members))
            one_of = "" if node.any_name else f", one of: {known}" if known else " (none declared)"
            return f"incomplete: expected ${{{reference}.<{node.noun}>}}{one_of}"
        return None

    def hint(self, name: str) -> str:
        """The nearest known name to `name`, or every known one."""
        known = sorted(self.members)
        nearest = difflib.get_close_matches(name, known, n=1)
        if nearest:
            return f"did you mean '{nearest[0]}'?"
        return f"expected one of: {', '.join(known)}" if known else "none declared"


def _scope(shape: Any, path: tuple[str, ...],
           fill: Callable[[tuple[str, ...]], tuple[Iterable[str] | None, dict[str, str]]]
           ) -> Scope | None:
    """PROVIDES' `shape` at `path` as a Scope, each `<placeholder>` replaced by what `fill`
    declares there: the names (None: any name) and those that exist, but not here."""
    if shape is None:
        return None
    placeholder = next((key for key in shape if key.startswith("<")), None)
    if placeholder is None:
        return Scope("attribute", {k: _scope(v, (*path, k), fill) for k, v in shape.items()})
    names, absent = fill(path)
    item = shape[placeholder]
    return Scope(placeholder.strip("<>"), {n: _scope(item, (*path, n), fill) for n in names or ()},
                 absent, any_name=names is None)


def image_source(config: TestConfig) -> str:
    """How the config gives its image: a key of IMAGE_ATTRIBUTES."""
    if config.image.ref is not None:
        return "image.ref"
    assert config.image.build is not None
    return "image.build.codebuild" if config.image.build.codebuild else "image.build.command"


@dataclass(frozen=True)
class Declared:
    """What references may name, as a config and its engines declare it."""

    services: set[str]
    variables: dict[str, set[str]]  # per applicable engine
    outputs: dict[str, tuple[str, ...]]  # per pipeline, in the order they run
    image: str | None  # how the image is given (a key of IMAGE_ATTRIBUTES); None: any way

    def scope(self, absent: dict[str, str], ran: int | None = None) -> Scope:
        """The roots a field is rendered with: all but `absent` (each with why); `outputs` of
        the first `ran` pipelines (None: all of them)."""
        pipelines = list(self.outputs)
        ran = len(pipelines) if ran is None else ran

        def fill(path: tuple[str, ...]) -> tuple[Iterable[str] | None, dict[str, str]]:
            if path == ("services",):
                return self.services, {}
            if path == ("vars",):
                declared = [set(v) for v in self.variables.values()]
                common = set.intersection(*declared) if declared else set()
                return common, {
                    name: "is not declared by engine(s) " + ", ".join(
                        e for e, names in self.variables.items() if name not in names)
                    for name in set().union(*declared) - common}
            if path == ("image",):
                return _image_attributes(self.image)
            if path == ("outputs",):
                return pipelines[:ran], {
                    name: "has not run yet here (outputs come from the pipelines before)"
                    for name in pipelines[ran:]}
            if path[0] == "outputs":
                return self.outputs[path[1]], {}
            if path == ("env",):
                return None, {}  # any variable: the environment is known only at run time
            raise ValueError(f"PROVIDES has a placeholder under {'.'.join(path)} that nothing "
                             "declares names for")

        roots = {root: _scope(PROVIDES[root], (root,), fill) for root in PROVIDES
                 if root not in absent}
        return Scope("root", roots, absent)

    def lazy_scope(self, absent: dict[str, str], ran: int | None = None
                   ) -> Callable[[], Scope]:
        """`scope`, built when first asked for."""
        return functools.cache(functools.partial(self.scope, absent, ran))


def _image_attributes(source: str | None) -> tuple[Iterable[str], dict[str, str]]:
    everything = sorted({a for names in IMAGE_ATTRIBUTES.values() for a in names})
    if source is None:
        return everything, {}
    return IMAGE_ATTRIBUTES[source], {
        name: f"does not exist with {source} (only with "
              f"{', '.join(s for s, names in IMAGE_ATTRIBUTES.items() if name in names)})"
        for name in everything if name not in IMAGE_ATTRIBUTES[source]}


def _strings(value: Any, location: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every string inside a nested structure of lists and dicts, with its location."""
    if isinstance(value, str):
        yield location, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, (*location, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, (*location, i))


def _unresolvable(prefix: str, location: tuple[Any, ...], text: str,
                  scope: Callable[[], Scope]) -> list[str]:
    references = REFERENCE.findall(text)
    if not references:  # most strings: the scope is built only for those that need it
        return []
    return [f"{prefix}{location_text(location)}: ${{{ref}}}: {problem}"
            for ref in references if (problem := scope().problem(ref))]


def _manifest_documents(path: Path) -> list[Any]:
    """A manifest file's documents; none if it cannot be read (a missing file is a problem of
    its own, an unreadable one fails the sandbox stage, naming the document)."""
    try:
        return list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError):
        return []


def _in_manifest(prefix: str, file: Path, scope: Callable[[], Scope]) -> list[str]:
    """The references in a manifest file (templated whole) that can never resolve."""
    return [problem for index, document in enumerate(_manifest_documents(file), start=1)
            for location, text in _strings(document, ())
            for problem in _unresolvable(f"{prefix}document {index}: ", location, text, scope)]


def reference_problems(path: Path, config: TestConfig, settings: Settings, root: Path,
                       settings_path: Path) -> list[str]:
    """What in a config names something that can never be there: a service or output by name,
    or a `${...}` reference in the config or in a manifest its sandbox or pipelines apply."""
    engines = [e for e in (config.engines or settings.engines) if e in settings.engines]
    # An engine's services join every sandbox on it: usable when every applicable engine has it.
    per_engine = [{s.name for s in settings.engines[e].services} for e in engines]
    shared = set.intersection(*per_engine) if per_engine else set()
    declared = Declared(
        {s.name for s in config.sandbox.services} | shared,
        {e: set(settings.engines[e].variables) for e in engines},
        {p.name: (*p.outputs, *KIND_OUTPUTS.get(p.kind, ())) for p in config.pipelines},
        image_source(config))
    return [*_name_problems(path, config, settings, engines, declared),
            *_config_references(path, config, declared, root),
            *_engine_manifest_references(settings_path, config, settings, engines, declared, root)]


def _name_problems(path: Path, config: TestConfig, settings: Settings, engines: list[str],
                   declared: Declared) -> list[str]:
    """Service names used twice, and metrics and routes naming what is not declared."""
    problems = []
    for engine in engines:
        for name in {s.name for s in settings.engines[engine].services} & {
                s.name for s in config.sandbox.services}:
            problems.append(f"{path}: sandbox.services: '{name}' is also a service of engine "
                            f"'{engine}' (expected distinct names)")
    for name, metric in config.metrics.items():
        pipeline, output = metric.source.split(".")
        if output not in declared.outputs.get(pipeline, ()):
            problems.append(f"{path}: metrics.{name}.source: '{metric.source}' is not a declared "
                            "output (expected <pipeline>.<output>)")
    services = declared.services
    for i, route in enumerate(config.ui_smoke.routes):
        if route.service not in services:
            problems.append(
                f"{path}: ui_smoke.routes[{i}].service: unknown service '{route.service}' "
                f"(expected one of: {', '.join(sorted(services)) or 'no services declared'})")
    return problems


def _config_references(path: Path, config: TestConfig, declared: Declared, root: Path
                       ) -> list[str]:
    """Each section's references, against what it is rendered with: the image before anything
    exists, the sandbox (a local service with its own port), each pipeline after those before
    it (a submit_poll pipeline's URLs with the job's id), the UI checks after every pipeline."""
    problems = []
    body = config.model_dump(mode="json", by_alias=True)
    prefix = f"{path}: "
    before_image = declared.lazy_scope({r: BEFORE_IMAGE for r in ROOTS if r != "env"})
    for location, text in _strings(body["image"], ("image",)):
        problems += _unresolvable(prefix, location, text, before_image)
    sandbox = declared.lazy_scope(ONLY_IN)
    in_service = declared.lazy_scope(_without(ONLY_IN, "port"))
    for location, text in _strings(body["sandbox"], ("sandbox",)):
        own = location[1] == "services" and isinstance(
            config.sandbox.services[location[2]], ServiceSpec)
        problems += _unresolvable(prefix, location, text, in_service if own else sandbox)
    for where, manifest in config.sandbox.named_files():
        problems += _in_manifest(f"{prefix}{where}: {manifest}: ", root / manifest, sandbox)
    for i, pipeline in enumerate(config.pipelines):
        at_run = declared.lazy_scope(_without(ONLY_IN, "outputs"), ran=i)
        polled = declared.lazy_scope(_without(ONLY_IN, "outputs", "id"), ran=i)
        for location, text in _strings(body["pipelines"][i], ("pipelines", i)):
            own_id = pipeline.kind == "submit_poll" and location[2] in POLLED_FIELDS
            problems += _unresolvable(prefix, location, text, polled if own_id else at_run)
        if hasattr(pipeline, "manifest"):
            problems += _in_manifest(f"{prefix}pipelines[{i}].manifest: {pipeline.manifest}: ",
                                     root / pipeline.manifest, at_run)
    after_pipelines = declared.lazy_scope(_without(ONLY_IN, "outputs"))
    for location, text in _strings(body["ui_smoke"], ("ui_smoke",)):
        problems += _unresolvable(prefix, location, text, after_pipelines)
    return problems


def _engine_manifest_references(settings_path: Path, config: TestConfig, settings: Settings,
                                engines: list[str], declared: Declared, root: Path
                                ) -> list[str]:
    """A Kubernetes sandbox applies its engine's manifests before its own, rendered alike
    (with that engine's variables)."""
    if not hasattr(config.sandbox, "manifests"):
        return []
    problems = []
    for engine in engines:
        on_engine = replace(declared, variables={engine: declared.variables[engine]})
        scope = on_engine.lazy_scope(ONLY_IN)
        for i, manifest in enumerate(settings.engines[engine].manifests):
            problems += _in_manifest(
                f"{settings_path}: engines.{engine}.manifests[{i}]: {manifest}: ",
                root / manifest, scope)
    return problems


def engine_reference_problems(settings_path: Path, settings: Settings,
                              configs: list[TestConfig]) -> list[str]:
    """References in the engines' variables and services that can never resolve. Both are
    rendered in each sandbox on the engine: its services are the engine's and its configs'."""
    problems = []
    for name, engine in settings.engines.items():
        on_engine = [c for c in configs if name in (c.engines or settings.engines)]
        services = {s.name for s in engine.services} | {
            s.name for c in on_engine for s in c.sandbox.services}
        declared = Declared(services, {name: set(engine.variables)}, {}, None)
        variables = declared.lazy_scope({**ONLY_IN, "vars": BEFORE_VARIABLES})
        in_service = declared.lazy_scope(_without(ONLY_IN, "port"))
        body = engine.model_dump(mode="json", include={"variables", "services"})
        location: tuple[Any, ...] = ("engines", name)
        for place, text in _strings(body["variables"], (*location, "variables")):
            problems += _unresolvable(f"{settings_path}: ", place, text, variables)
        for place, text in _strings(body["services"], (*location, "services")):
            problems += _unresolvable(f"{settings_path}: ", place, text, in_service)
    return problems


def _without(reasons: dict[str, str], *roots: str) -> dict[str, str]:
    return {root: why for root, why in reasons.items() if root not in roots}

