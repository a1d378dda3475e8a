"""What a real API server serves under /openapi/v3 for the kinds the emulator holds, and its
strict field validation: enough for a real `kubectl` (1.27 and later) to apply manifests
against the emulator as it does against a cluster.

`kubectl apply` first asks the server's OpenAPI v3 documents whether the POST and PATCH of the
object's kind take the `fieldValidation` query parameter (client-go
`staging/src/k8s.io/cli-runtime/pkg/resource/query_param_verifier_v3.go`, HasSupport: a path
whose operation carries the kind in `x-kubernetes-group-version-kind`); it then sends
`fieldValidation=Strict`, and the server refuses an unknown field with 400 (k8s.io/apiserver
`pkg/endpoints/handlers`: `<Kind> in version "<v>" cannot be handled as a <Kind>: strict
decoding error: unknown field "<path>"`).

The schemas are the official ones as `kubernetes-validate` (PyPI) bundles them from
kubernetes/kubernetes `api/openapi-spec` (JSON Schema there: converted back to OpenAPI 3's
`nullable` and `#/components/schemas/` references); a custom resource gets a schema that keeps
unknown fields, as a CRD without a structural schema does. Not served: OpenAPI v2
(`/openapi/v2`, protobuf, which kubectl before 1.27 needs), and per-path request and response
bodies beyond the parameters kubectl reads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate

Obj = dict[str, Any]
SCHEMAS_VERSION = kubernetes_validate.latest_version()
QUERY_PARAMETERS = ("dryRun", "fieldManager", "fieldValidation", "pretty")


def _schema_file() -> Path:
    folder = Path(os.path.dirname(kubernetes_validate.__file__)) / "kubernetes-json-schema"
    return folder / f"v{SCHEMAS_VERSION}-local" / "_definitions.json"


def _openapi(node: Any) -> Any:
    """A JSON Schema node of kubernetes-validate's as OpenAPI 3 writes it."""
    if isinstance(node, list):
        return [_openapi(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: Obj = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            out[key] = value.replace("#/$defs/", "#/components/schemas/")
        elif key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            out[key] = types[0] if len(types) == 1 else types
            if "null" in value:
                out["nullable"] = True
        else:
            out[key] = _openapi(value)
    return out


@functools.cache
def official_schemas() -> dict[str, Obj]:
    """Every definition of the official API, by name, each top-level kind tagged with its
    group, version and kind as a real server tags it."""
    definitions = json.loads(_schema_file().read_text())["$defs"]
    schemas = {}
    for name, schema in definitions.items():
        converted = _openapi(schema)
        properties = schema.get("properties", {})
        versions = properties.get("apiVersion", {}).get("enum")
        kinds = properties.get("kind", {}).get("enum")
        if versions and kinds:
            group, _, version = versions[0].rpartition("/")
            converted["x-kubernetes-group-version-kind"] = [
                {"group": group, "version": version, "kind": kinds[0]}]
        schemas[name] = converted
    return schemas


def _group_version_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _kind_schema(group: str, version: str, kind: str) -> tuple[str, Obj]:
    """The name and schema of a kind: the official one, or for a custom resource one that
    keeps unknown fields."""
    gvk = {"group": group, "version": version, "kind": kind}
    for name, schema in official_schemas().items():
        if gvk in schema.get("x-kubernetes-group-version-kind", []):
            return name, schema
    name = ".".join(reversed(group.split("."))) + f".{version}.{kind}"
    return name, {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                  "x-kubernetes-group-version-kind": [gvk]}


def root(types: Iterable[Any]) -> Obj:
    """`/openapi/v3`: the group versions served, each at a URL that changes with its content."""
    types = tuple(types)
    paths = {}
    for group, version in sorted({(t.group, t.version) for t in types}):
        path = _group_version_path(group, version)
        digest = hashlib.sha256(_document(tuple(types), path).encode()).hexdigest()[:16]
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest.upper()}"}
    return {"paths": paths}


@functools.cache
def _document(types: tuple[Any, ...], path: str) -> str:
    served = [t for t in types if _group_version_path(t.group, t.version) == path]
    if not served:
        return ""
    parameters = [{"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                  for name in QUERY_PARAMETERS]
    paths: Obj = {}
    schemas: Obj = {}
    for t in served:
        name, schema = _kind_schema(t.group, t.version, t.kind)
        schemas[name] = schema
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        base = f"/{path}" + ("/namespaces/{namespace}" if t.namespaced else "") + f"/{t.plural}"
        operation = {"x-kubernetes-group-version-kind": gvk, "parameters": parameters,
                     "requestBody": {"content": {"application/json": {
                         "schema": {"$ref": f"#/components/schemas/{name}"}}}}}
        paths[base] = {"post": {**operation, "x-kubernetes-action": "post"}}
        paths[base + "/{name}"] = {"put": {**operation, "x-kubernetes-action": "put"},
                                   "patch": {**operation, "x-kubernetes-action": "patch"}}
    if any(not t.custom for t in served):
        schemas = {**official_schemas(), **schemas}  # the kinds refer to the shared ones
    return json.dumps({"openapi": "3.0.0", "info": {"title": "Kubernetes",
                                                    "version": f"v{SCHEMAS_VERSION}"},
                       "paths": paths, "components": {"schemas": schemas}})


def document(types: Iterable[Any], path: str) -> Obj | None:
    """`/openapi/v3/<path>` (`api/v1`, `apis/apps/v1`): the group version's paths and schemas;
    None when no kind of the emulator is in it."""
    text = _document(tuple(types), path)
    return json.loads(text) if text else None


_UNKNOWN = re.compile(r"Additional properties are not allowed \((.+) (?:was|were) unexpected\)")


@functools.cache
def _strict_validator(api_version: str, kind: str) -> Any:
    """The official strict schema of a kind as a validator (kubernetes_validate.validate's own
    files and registry, to list every error, not only the first); None without a schema."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{SCHEMAS_VERSION}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = schema_contents(f"{folder}/{kind.lower()}-{group_version}.json",
                                 SCHEMAS_VERSION)
    except FileNotFoundError:
        return None
    definitions = schema_contents(f"{folder}/_definitions.json", SCHEMAS_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema)
                                                      @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _field_path(parts: Iterable[Any]) -> str:
    """`spec.ports[0].name`, as the API server writes a field's path."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def unknown_fields(obj: Obj) -> list[str]:
    """The fields of `obj` its kind's official schema does not know, as a strict server names
    them (`spec.ports[0].nam`); [] for a custom resource, or a kind without a schema."""
    validator = _strict_validator(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    if validator is None:
        return []
    found = []
    for error in validator.iter_errors(obj):
        for leaf in [error, *error.context]:
            match = _UNKNOWN.search(leaf.message)
            if match:
                prefix = _field_path(leaf.absolute_path)
                found += [f"{prefix}.{field}" if prefix else field
                          for field in re.findall(r"'([^']+)'", match.group(1))]
    return sorted(set(found))
