"""Kubernetes authorization as the API server decides it, in pure functions over plain dicts: a
request's attributes from its method, path and query (the apiserver's RequestInfo), RBAC's rules,
bindings and subjects (the RBAC authorizer), the escalation checks on writes of Roles and
RoleBindings (the rbac registry's policy-based storage), and the 403 bodies they answer with.
`kube_wire.KubeApiServer(rbac=True)` applies them to every request; tests read them as tables.

Followed from kubernetes/kubernetes: apiserver's `endpoints/request/requestinfo.go`, the
RBAC authorizer's `rbac.go` (RuleAllows, appliesTo), `pkg/registry/rbac/validation/rule.go`
(ConfirmNoEscalation), `pkg/registry/rbac/escalation_check.go` (EscalationAllowed,
RoleEscalationAuthorized, BindingAuthorized), component-helpers' `policy_comparator.go`
(Covers) and apiserver's `handlers/responsewriters/errors.go` (the 403 text). Not followed:
ClusterRole aggregation (`aggregationRule`), the Node and webhook authorizers, impersonation,
SubjectAccessReviews, and the bootstrap roles beyond the three in BOOTSTRAP_POLICY.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"  # the privileged group: every request allowed, no escalation check
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
ROLE_KINDS = {"Role": "roles", "ClusterRole": "clusterroles"}
BINDING_KINDS = {"RoleBinding": "rolebindings", "ClusterRoleBinding": "clusterrolebindings"}
_SPECIAL_VERBS = ("proxy", "watch")  # /api/v1/watch/..., /api/v1/proxy/... (deprecated forms)
_NAMESPACE_SUBRESOURCES = ("status", "finalize")
_GC_FIELDS = ("ownerReferences", "finalizers", "resourceVersion", "managedFields", "generation",
              "uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


@dataclass(frozen=True)
class User:
    """Who a request comes from, as an authenticator says: a name and groups."""

    name: str
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(cls, namespace: str, name: str) -> User:
        """`system:serviceaccount:<ns>:<name>` in the groups every service account token gets."""
        return cls(f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}", (
            "system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED))

    @property
    def privileged(self) -> bool:
        return MASTERS in self.groups

    def service_account_ref(self) -> tuple[str, str] | None:
        """(namespace, name) when this is a service account."""
        if not self.name.startswith(SERVICE_ACCOUNT_PREFIX):
            return None
        namespace, _, name = self.name[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
        return (namespace, name) if namespace and name else None


@dataclass(frozen=True)
class Attributes:
    """What a request asks, as the authorizer sees it."""

    verb: str
    path: str = ""
    resource_request: bool = False
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""

    @property
    def combined_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


@dataclass(frozen=True)
class Denial:
    """A refusal, as the `kind: Status` body the server writes for it."""

    code: int
    reason: str
    message: str
    details: Obj


# --- the request's attributes -------------------------------------------------------------

def request_attributes(method: str, path: str, params: Mapping[str, str] | None = None
                       ) -> Attributes:
    """RequestInfo: `/api/v1/...` and `/apis/<group>/<version>/...` are resource requests whose
    verb comes from the method (GET without a name: list, or watch with `watch=true`; DELETE
    without one: deletecollection); anything else, discovery included, is a non-resource
    request whose verb is the method in lower case. `path` is percent-decoded."""
    params = params or {}
    parts = path.strip("/").split("/") if path.strip("/") else []
    plain = Attributes(verb=method.lower(), path=path)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return plain
    group, rest = "", parts[1:]
    if parts[0] == "apis":
        if len(rest) < 3:
            return plain
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    if rest[0] in _SPECIAL_VERBS:
        verb, rest = rest[0], rest[1:]
    else:
        verb = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete"}.get(method.upper(), "")
    namespace = ""
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 and verb not in _SPECIAL_VERBS else ""
    if not name and verb == "get":
        verb = "watch" if params.get("watch", "").lower() in ("true", "1") else "list"
        selected = _exact_name(params.get("fieldSelector", ""))
        name = selected or name
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(verb, path, True, group, version, namespace, resource, subresource, name)


def _exact_name(field_selector: str) -> str:
    """The name a field selector pins (`metadata.name=x`): a list of one named object is
    authorized as that name, so `resourceNames` rules can allow it."""
    for term in field_selector.split(","):
        key, op, value = term.strip().partition("==" if "==" in term else "=")
        if op and key.strip() == "metadata.name" and "!" not in key:
            return value.strip()
    return ""


# --- rules, subjects, bindings --------------------------------------------------------------

def rule_allows(rule: Obj, attrs: Attributes) -> bool:
    """One PolicyRule against one request: verbs, API groups, resources (`*`, exact,
    `resource/subresource`, `*/subresource`) and resource names; or non-resource URLs (exact, or
    a prefix ending in `*`)."""
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.resource_request:
        return any(url == "*" or url == attrs.path or url.endswith("*") and
                   attrs.path.startswith(url.rstrip("*")) for url in rule.get(
                       "nonResourceURLs") or [])
    groups = rule.get("apiGroups") or []
    if "*" not in groups and attrs.api_group not in groups:
        return False
    if not any(resource == "*" or resource == attrs.combined_resource or (
            attrs.subresource and resource == f"*/{attrs.subresource}")
            for resource in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def subject_applies(subject: Obj, user: User, namespace: str) -> bool:
    """A binding's subject is the user: a User by name, a Group by membership, a
    ServiceAccount by `system:serviceaccount:<ns>:<name>`, its namespace defaulting to the
    binding's."""
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return user.name == name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        sa_namespace = subject.get("namespace") or namespace
        return bool(sa_namespace) and user.name == f"{SERVICE_ACCOUNT_PREFIX}{sa_namespace}:{name}"
    return False


@dataclass(frozen=True)
class Policy:
    """The RBAC objects a decision reads: Roles and RoleBindings (namespaced), ClusterRoles and
    ClusterRoleBindings."""

    roles: tuple[Obj, ...] = ()
    cluster_roles: tuple[Obj, ...] = ()
    role_bindings: tuple[Obj, ...] = ()
    cluster_role_bindings: tuple[Obj, ...] = ()

    @classmethod
    def from_objects(cls, objects: Iterable[Obj]) -> Policy:
        by_kind: dict[str, list[Obj]] = {}
        for obj in objects:
            by_kind.setdefault(obj.get("kind", ""), []).append(obj)
        return cls(*(tuple(by_kind.get(kind, ())) for kind in (
            "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")))

    def role_rules(self, role_ref: Obj, namespace: str) -> list[Obj] | None:
        """The rules of the Role (in namespace) or ClusterRole a roleRef names; None if it
        does not exist."""
        kind, name = role_ref.get("kind"), role_ref.get("name")
        candidates = (self.cluster_roles if kind == "ClusterRole" else [
            r for r in self.roles if r["metadata"].get("namespace") == namespace]
            if kind == "Role" else [])
        for role in candidates:
            if role["metadata"].get("name") == name:
                return list(role.get("rules") or [])
        return None

    def rules_for(self, user: User, namespace: str) -> list[Obj]:
        """Every rule the user holds in namespace ("": cluster-wide only): its ClusterRoleBindings'
        and, in a namespace, that namespace's RoleBindings'."""
        rules: list[Obj] = []
        for binding in self.cluster_role_bindings:
            if any(subject_applies(s, user, "") for s in binding.get("subjects") or []):
                rules += self.role_rules(binding.get("roleRef") or {}, "") or []
        if namespace:
            for binding in self.role_bindings:
                if binding["metadata"].get("namespace") == namespace and any(
                        subject_applies(s, user, namespace) for s in binding.get(
                            "subjects") or []):
                    rules += self.role_rules(binding.get("roleRef") or {}, namespace) or []
        return rules

    def allows(self, user: User, attrs: Attributes) -> bool:
        return user.privileged or any(rule_allows(rule, attrs)
                                      for rule in self.rules_for(user, attrs.namespace))


def forbidden(user: User, attrs: Attributes, why: str = "") -> Denial:
    """The 403 of a request the authorizer refused, worded as the server words it."""
    if not attrs.resource_request:
        text = f"User {_q(user.name)} cannot {attrs.verb} path {_q(attrs.path)}"
    else:
        where = (f"in the namespace {_q(attrs.namespace)}" if attrs.namespace
                 else "at the cluster scope")
        text = (f"User {_q(user.name)} cannot {attrs.verb} resource "
                f"{_q(attrs.combined_resource)} in API group {_q(attrs.api_group)} {where}")
    if why:
        text = f"{text}: {why}"
    group_resource = (f"{attrs.resource}.{attrs.api_group}" if attrs.api_group
                      else attrs.resource) if attrs.resource_request else ""
    return Denial(403, "Forbidden", _forbidden_text(group_resource, attrs.name, text),
                  _details(attrs.name, attrs.api_group if attrs.resource_request else "",
                           attrs.resource if attrs.resource_request else ""))


def _forbidden_text(group_resource: str, name: str, text: str) -> str:
    """apierrors.NewForbidden's message."""
    if not group_resource:
        return f"forbidden: {text}"
    if not name:
        return f"{group_resource} is forbidden: {text}"
    return f"{group_resource} {_q(name)} is forbidden: {text}"


def _details(name: str, group: str, kind: str) -> Obj:
    return {**({"name": name} if name else {}), **({"group": group} if group else {}),
            **({"kind": kind} if kind else {})}


def _q(text: str) -> str:
    """Go's %q of a plain string."""
    return json.dumps(text, ensure_ascii=False)


def _q_list(items: Iterable[str]) -> str:
    """Go's %q of a []string: `["a" "b"]`."""
    return "[" + " ".join(_q(i) for i in items) + "]"


# --- escalation: granting only what one holds ------------------------------------------------

def breakdown(rule: Obj) -> list[Obj]:
    """A rule as its atoms: one group, resource, verb (and resource name) each; non-resource
    URLs one per verb."""
    atoms = []
    for group in rule.get("apiGroups") or []:
        for resource in rule.get("resources") or []:
            for verb in rule.get("verbs") or []:
                base = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
                names = rule.get("resourceNames") or []
                atoms += [{**base, "resourceNames": [n]} for n in names] if names else [base]
    for url in rule.get("nonResourceURLs") or []:
        atoms += [{"nonResourceURLs": [url], "verbs": [verb]} for verb in rule.get("verbs") or []]
    return atoms


def _resources_cover(owned: list[str], wanted: list[str]) -> bool:
    if "*" in owned:
        return True
    for resource in wanted:
        if resource in owned:
            continue
        if "/" not in resource or f"*/{resource.split('/', 1)[1]}" not in owned:
            return False
    return True


def _urls_cover(owned: list[str], wanted: list[str]) -> bool:
    return all(any(o == w or o.endswith("*") and w.startswith(o.rstrip("*")) for o in owned)
               for w in wanted)


def rule_covers(owner: Obj, atom: Obj) -> bool:
    """Whether a rule one holds covers an atom of a rule one grants. A `*` granted is covered
    only by a `*` held: holding every verb one by one is not holding `*`."""
    def covers_all(owned: list[str], wanted: list[str]) -> bool:
        return "*" in owned or all(w in owned for w in wanted)

    owned_names, wanted_names = owner.get("resourceNames") or [], atom.get("resourceNames") or []
    return (covers_all(owner.get("verbs") or [], atom.get("verbs") or [])
            and covers_all(owner.get("apiGroups") or [], atom.get("apiGroups") or [])
            and _resources_cover(owner.get("resources") or [], atom.get("resources") or [])
            and _urls_cover(owner.get("nonResourceURLs") or [], atom.get("nonResourceURLs") or [])
            and (not owned_names or bool(wanted_names) and all(
                n in owned_names for n in wanted_names)))


def uncovered(owner_rules: list[Obj], granted_rules: list[Obj]) -> list[Obj]:
    """The atoms of granted_rules that no rule in owner_rules covers."""
    return [atom for rule in granted_rules for atom in breakdown(rule)
            if not any(rule_covers(owner, atom) for owner in owner_rules)]


def compact_string(rule: Obj) -> str:
    """rbacv1helpers.CompactString: `{APIGroups:[""], Resources:["pods"], Verbs:["get"]}`."""
    fields = (("APIGroups", "apiGroups"), ("Resources", "resources"),
              ("NonResourceURLs", "nonResourceURLs"), ("ResourceNames", "resourceNames"),
              ("Verbs", "verbs"))
    return "{" + ", ".join(f"{label}:{_q_list(rule[key])}" for label, key in fields
                           if rule.get(key)) + "}"


def _compact(atoms: list[Obj]) -> list[Obj]:
    """CompactRules: atoms of one group and resource (and at most one name) merge their
    verbs."""
    merged: dict[tuple[Any, ...], Obj] = {}
    others = []
    for atom in atoms:
        if atom.get("nonResourceURLs") or len(atom.get("resourceNames") or []) > 1:
            others.append(atom)
            continue
        key = (atom["apiGroups"][0], atom["resources"][0], tuple(atom.get("resourceNames") or ()))
        if key in merged:
            merged[key]["verbs"] += [v for v in atom["verbs"] if v not in merged[key]["verbs"]]
        else:
            merged[key] = copy.deepcopy(atom)
    return others + list(merged.values())


def escalation_message(user: User, missing: list[Obj]) -> str:
    held = "\n".join(sorted({compact_string(rule) for rule in _compact(missing)}))
    return (f"user {_q(user.name)} (groups={_q_list(user.groups)}) is attempting to grant RBAC "
            f"permissions not currently held:\n{held}")


def _only_gc_fields_differ(old: Obj | None, new: Obj) -> bool:
    if old is None:
        return False

    def essence(obj: Obj) -> Obj:
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _GC_FIELDS}
        return {**{k: v for k, v in obj.items() if k != "metadata"}, "metadata": meta}
    return essence(old) == essence(new)


def escalation_denial(policy: Policy, user: User, attrs: Attributes, old: Obj | None,
                      new: Obj) -> Denial | None:
    """Whether writing `new` (a Role, ClusterRole, RoleBinding or ClusterRoleBinding; `old`
    the object it replaces, None on create) grants more than the user holds in its namespace.
    A Role's rules must all be held, unless the user may `escalate` roles; a binding's role
    must be held, unless the user may `bind` it (by its name). system:masters may do anything;
    a write that changes only what garbage collection changes is never checked."""
    kind, name = new.get("kind", ""), (new.get("metadata") or {}).get("name", "")
    namespace = attrs.namespace
    if user.privileged or _only_gc_fields_differ(old, new):
        return None
    group_resource = f"{ROLE_KINDS.get(kind) or BINDING_KINDS.get(kind)}.{RBAC_GROUP}"
    if kind in ROLE_KINDS:
        escalate = Attributes("escalate", attrs.path, True, RBAC_GROUP, attrs.api_version,
                              namespace, ROLE_KINDS[kind], "", attrs.name)
        if policy.allows(user, escalate):
            return None
        granted = list(new.get("rules") or [])
    elif kind in BINDING_KINDS:
        role_ref = new.get("roleRef") or {}
        role_kind = role_ref.get("kind", "")
        if role_kind in ROLE_KINDS and policy.allows(user, Attributes(
                "bind", attrs.path, True, role_ref.get("apiGroup", RBAC_GROUP),
                attrs.api_version, namespace, ROLE_KINDS[role_kind], "",
                role_ref.get("name", ""))):
            return None
        rules = policy.role_rules(role_ref, namespace)
        if rules is None:
            missing = f"{role_kind.lower()}.{RBAC_GROUP}"
            return Denial(400, "BadRequest", f"{missing} {_q(role_ref.get('name', ''))} not found",
                          {})
        granted = rules
    else:
        return None
    missing = uncovered(policy.rules_for(user, namespace), granted)
    if not missing:
        return None
    return Denial(403, "Forbidden", _forbidden_text(group_resource, name, escalation_message(
        user, missing)), _details(name, RBAC_GROUP, group_resource.split(".", 1)[0]))


# --- what every cluster starts with --------------------------------------------------------

def _cluster_role(name: str, rules: list[Obj]) -> Obj:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "rules": rules}


def _cluster_role_binding(name: str, groups: list[str]) -> Obj:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups]}


_INFO_URLS = ["/livez", "/readyz", "/healthz", "/version", "/version/"]
BOOTSTRAP_POLICY: tuple[Obj, ...] = (
    _cluster_role("cluster-admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                                    {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
    _cluster_role_binding("cluster-admin", [MASTERS]),
    # Discovery for every authenticated user, as the bootstrap policy grants it.
    _cluster_role("system:discovery", [{"nonResourceURLs": [
        *_INFO_URLS, "/openapi", "/openapi/*", "/api", "/api/*", "/apis", "/apis/*"],
        "verbs": ["get"]}]),
    _cluster_role_binding("system:discovery", [AUTHENTICATED]),
    _cluster_role("system:public-info-viewer", [{"nonResourceURLs": _INFO_URLS,
                                                 "verbs": ["get"]}]),
    _cluster_role_binding("system:public-info-viewer", [AUTHENTICATED, UNAUTHENTICATED]),
)
