"""The emulator's authorization rules (tests/support/kube_rbac.py) by tables: a request's
attributes as the API server reads them from its method and path, RBAC's rule and subject
matching, the rules a user holds per namespace, the escalation checks on Roles and
RoleBindings, and the 403 texts the real server writes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.kube_rbac import (
    BOOTSTRAP_POLICY,
    RBAC_GROUP,
    Attributes,
    Policy,
    User,
    compact_string,
    escalation_denial,
    forbidden,
    request_attributes,
    rule_allows,
    subject_applies,
    uncovered,
)

RUN = User.service_account("mlci", "mlci-run")
ALICE = User("alice", ("devs", "system:authenticated"))
ADMIN = User("kubernetes-admin", ("system:masters", "system:authenticated"))


def rule(groups: list[str], resources: list[str], verbs: list[str], **extra: Any) -> dict:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs, **extra}


def resource(verb: str, resource: str, namespace: str = "", group: str = "", name: str = "",
             subresource: str = "") -> Attributes:
    return Attributes(verb, "", True, group, "v1", namespace, resource, subresource, name)


def role(name: str, namespace: str, *rules: dict) -> dict:
    return {"kind": "Role", "metadata": {"name": name, "namespace": namespace},
            "rules": list(rules)}


def cluster_role(name: str, *rules: dict) -> dict:
    return {"kind": "ClusterRole", "metadata": {"name": name}, "rules": list(rules)}


def binding(name: str, namespace: str | None, role_kind: str, role_name: str,
            *subjects: dict) -> dict:
    kind = "RoleBinding" if namespace else "ClusterRoleBinding"
    return {"kind": kind, "metadata": {"name": name, **({"namespace": namespace}
                                                         if namespace else {})},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": role_kind, "name": role_name},
            "subjects": list(subjects)}


SA_RUN = {"kind": "ServiceAccount", "name": "mlci-run", "namespace": "mlci"}


# --- the request's attributes ---------------------------------------------------------------

@pytest.mark.parametrize("method, path, params, expected", [
    ("GET", "/api/v1/namespaces/x/pods", {}, resource("list", "pods", "x")),
    ("GET", "/api/v1/namespaces/x/pods", {"watch": "true"}, resource("watch", "pods", "x")),
    ("GET", "/api/v1/namespaces/x/pods", {"fieldSelector": "metadata.name=p1"},
     resource("list", "pods", "x", name="p1")),
    ("GET", "/api/v1/namespaces/x/pods", {"fieldSelector": "metadata.name!=p1"},
     resource("list", "pods", "x")),
    ("GET", "/api/v1/pods", {}, resource("list", "pods")),
    ("POST", "/api/v1/namespaces/x/pods", {}, resource("create", "pods", "x")),
    ("GET", "/api/v1/namespaces/x/pods/p1/log", {},
     resource("get", "pods", "x", name="p1", subresource="log")),
    ("GET", "/api/v1/namespaces/x/services/http:mlflow:5000/proxy/api/2.0/runs", {},
     resource("get", "services", "x", name="http:mlflow:5000", subresource="proxy")),
    ("POST", "/api/v1/namespaces/x/services/web/proxy/", {},
     resource("create", "services", "x", name="web", subresource="proxy")),
    ("DELETE", "/apis/batch/v1/namespaces/x/jobs", {},
     resource("deletecollection", "jobs", "x", group="batch")),
    ("PATCH", "/apis/apps/v1/namespaces/x/deployments/web/status", {},
     resource("patch", "deployments", "x", group="apps", name="web", subresource="status")),
    # A namespace is its own namespace; its finalize and status are its subresources.
    ("GET", "/api/v1/namespaces/x", {}, resource("get", "namespaces", "x", name="x")),
    ("PUT", "/api/v1/namespaces/x/finalize", {},
     resource("update", "namespaces", "x", name="x", subresource="finalize")),
    ("POST", "/api/v1/namespaces", {}, resource("create", "namespaces")),
    ("DELETE", "/api/v1/namespaces/x", {}, resource("delete", "namespaces", "x", name="x")),
    ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", {},
     resource("create", "clusterroles", group=RBAC_GROUP)),
])
def test_resource_requests_read_as_the_api_server_reads_them(method, path, params, expected):
    assert request_attributes(method, path, params) == Attributes(**{
        **expected.__dict__, "path": path})


@pytest.mark.parametrize("method, path, verb", [
    ("GET", "/version", "get"), ("GET", "/api", "get"), ("GET", "/api/v1", "get"),
    ("GET", "/apis", "get"), ("GET", "/apis/apps", "get"), ("GET", "/apis/apps/v1", "get"),
    ("GET", "/healthz", "get"), ("POST", "/logs", "post"),
])
def test_discovery_and_other_paths_are_non_resource_requests(method, path, verb):
    assert request_attributes(method, path) == Attributes(verb, path)


# --- rules and subjects ---------------------------------------------------------------------

@pytest.mark.parametrize("policy_rule, attrs, allowed", [
    (rule([""], ["pods"], ["get"]), resource("get", "pods", "x"), True),
    (rule([""], ["pods"], ["get"]), resource("list", "pods", "x"), False),
    (rule([""], ["pods"], ["*"]), resource("deletecollection", "pods", "x"), True),
    (rule(["*"], ["pods"], ["get"]), resource("get", "pods", "x", group="metrics.k8s.io"), True),
    (rule([""], ["pods"], ["get"]), resource("get", "pods", "x", group="apps"), False),
    (rule([""], ["*"], ["get"]), resource("get", "secrets", "x"), True),
    # `*` covers subresources; a resource alone does not, `*/log` does.
    (rule([""], ["*"], ["get"]), resource("get", "pods", "x", subresource="log"), True),
    (rule([""], ["pods"], ["get"]), resource("get", "pods", "x", subresource="log"), False),
    (rule([""], ["pods/log"], ["get"]), resource("get", "pods", "x", subresource="log"), True),
    (rule([""], ["*/log"], ["get"]), resource("get", "pods", "x", subresource="log"), True),
    (rule([""], ["services/proxy"], ["get"]),
     resource("get", "services", "x", name="http:web:80", subresource="proxy"), True),
    (rule([""], ["services/proxy"], ["get"]),
     resource("create", "services", "x", name="web", subresource="proxy"), False),
    (rule([""], ["pods"], ["get"], resourceNames=["a"]), resource("get", "pods", "x", name="a"),
     True),
    (rule([""], ["pods"], ["get"], resourceNames=["a"]), resource("get", "pods", "x", name="b"),
     False),
    # A create names nothing yet: resourceNames cannot allow it.
    (rule([""], ["pods"], ["create"], resourceNames=["a"]), resource("create", "pods", "x"),
     False),
    ({"nonResourceURLs": ["/apis/*"], "verbs": ["get"]}, Attributes("get", "/apis/apps/v1"),
     True),
    ({"nonResourceURLs": ["/apis"], "verbs": ["get"]}, Attributes("get", "/apis/apps"), False),
    ({"nonResourceURLs": ["*"], "verbs": ["*"]}, Attributes("post", "/anything"), True),
    (rule(["*"], ["*"], ["*"]), Attributes("get", "/version"), False),
])
def test_a_rule_allows_a_request(policy_rule, attrs, allowed):
    assert rule_allows(policy_rule, attrs) is allowed


@pytest.mark.parametrize("subject, user, namespace, applies", [
    ({"kind": "User", "name": "alice"}, ALICE, "x", True),
    ({"kind": "User", "name": "bob"}, ALICE, "x", False),
    ({"kind": "Group", "name": "devs"}, ALICE, "x", True),
    ({"kind": "Group", "name": "system:serviceaccounts:mlci"}, RUN, "x", True),
    ({"kind": "Group", "name": "system:authenticated"}, RUN, "", True),
    (SA_RUN, RUN, "x", True),
    # A RoleBinding's ServiceAccount without a namespace is in the binding's namespace.
    ({"kind": "ServiceAccount", "name": "mlci-run"}, RUN, "mlci", True),
    ({"kind": "ServiceAccount", "name": "mlci-run"}, RUN, "x", False),
    ({"kind": "ServiceAccount", "name": "mlci-run"}, RUN, "", False),
    ({"kind": "User", "name": "system:serviceaccount:mlci:mlci-run"}, RUN, "x", True),
])
def test_a_subject_is_the_user(subject, user, namespace, applies):
    assert subject_applies(subject, user, namespace) is applies


POLICY = Policy.from_objects([
    cluster_role("reader", rule([""], ["pods", "pods/log"], ["get", "list"])),
    cluster_role("deployer", rule(["apps"], ["deployments"], ["create"])),
    role("sa-maker", "team", rule([""], ["serviceaccounts"], ["create"])),
    role("sa-maker", "other", rule([""], ["secrets"], ["get"])),
    binding("readers", None, "ClusterRole", "reader", SA_RUN),
    binding("deployers", "team", "ClusterRole", "deployer", {"kind": "Group", "name": "devs"}),
    binding("sa-makers", "team", "Role", "sa-maker", {"kind": "User", "name": "alice"}),
    binding("dangling", "team", "Role", "missing", {"kind": "User", "name": "alice"}),
    *BOOTSTRAP_POLICY,
])


@pytest.mark.parametrize("user, attrs, allowed", [
    (RUN, resource("list", "pods", "anywhere"), True),  # a ClusterRoleBinding: everywhere
    (RUN, resource("list", "pods"), True),  # and across namespaces
    (RUN, resource("get", "pods", "x", name="p", subresource="log"), True),
    (RUN, resource("create", "pods", "x"), False),
    (ALICE, resource("create", "deployments", "team", group="apps"), True),  # RB to a ClusterRole
    (ALICE, resource("create", "deployments", "other", group="apps"), False),  # its namespace only
    (ALICE, resource("create", "serviceaccounts", "team"), True),
    (ALICE, resource("get", "secrets", "team"), False),  # the Role of the binding's namespace
    (ALICE, resource("get", "secrets", "other"), False),
    (ALICE, Attributes("get", "/apis/apps/v1"), True),  # system:discovery
    (RUN, Attributes("get", "/version"), True),
    (RUN, Attributes("get", "/metrics"), False),
    (ADMIN, resource("delete", "namespaces", "kube-system", name="kube-system"), True),
])
def test_a_user_is_allowed_what_its_bindings_grant_where_they_grant_it(user, attrs, allowed):
    assert POLICY.allows(user, attrs) is allowed


# --- 403 texts --------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs, message, details", [
    (resource("create", "pods", "x"),
     'pods is forbidden: User "system:serviceaccount:mlci:mlci-run" cannot create resource '
     '"pods" in API group "" in the namespace "x"', {"kind": "pods"}),
    (resource("create", "roles", "x", group=RBAC_GROUP),
     'roles.rbac.authorization.k8s.io is forbidden: User "system:serviceaccount:mlci:mlci-run" '
     'cannot create resource "roles" in API group "rbac.authorization.k8s.io" in the namespace '
     '"x"', {"group": RBAC_GROUP, "kind": "roles"}),
    (resource("get", "services", "x", name="http:web:80", subresource="proxy"),
     'services "http:web:80" is forbidden: User "system:serviceaccount:mlci:mlci-run" cannot '
     'get resource "services/proxy" in API group "" in the namespace "x"',
     {"name": "http:web:80", "kind": "services"}),
    (resource("list", "namespaces"),
     'namespaces is forbidden: User "system:serviceaccount:mlci:mlci-run" cannot list resource '
     '"namespaces" in API group "" at the cluster scope', {"kind": "namespaces"}),
    (Attributes("get", "/metrics"),
     'forbidden: User "system:serviceaccount:mlci:mlci-run" cannot get path "/metrics"', {}),
])
def test_forbidden_says_who_cannot_do_what_where(attrs, message, details):
    denial = forbidden(RUN, attrs)
    assert (denial.code, denial.reason, denial.message, denial.details) == (
        403, "Forbidden", message, details)


# --- escalation -------------------------------------------------------------------------------

@pytest.mark.parametrize("owned, granted, missing", [
    ([rule([""], ["pods"], ["get", "list"])], [rule([""], ["pods"], ["get"])], []),
    ([rule([""], ["pods"], ["get"])], [rule([""], ["pods"], ["get", "list"])],
     [rule([""], ["pods"], ["list"])]),
    ([rule([""], ["*"], ["*"])], [rule([""], ["pods", "pods/log"], ["get"])], []),
    ([rule(["*"], ["*"], ["*"])], [rule(["apps"], ["deployments"], ["create"])], []),
    # Holding every verb is not holding `*`, nor every group `*`.
    ([rule([""], ["pods"], ["get", "list", "create"])], [rule([""], ["pods"], ["*"])],
     [rule([""], ["pods"], ["*"])]),
    ([rule(["", "apps"], ["pods"], ["get"])], [rule(["*"], ["pods"], ["get"])],
     [rule(["*"], ["pods"], ["get"])]),
    ([rule([""], ["*/log"], ["get"])], [rule([""], ["pods/log"], ["get"])], []),
    ([rule([""], ["pods"], ["get"])], [rule([""], ["pods/log"], ["get"])],
     [rule([""], ["pods/log"], ["get"])]),
    ([rule([""], ["pods"], ["get"])], [rule([""], ["pods"], ["get"], resourceNames=["a"])], []),
    ([rule([""], ["pods"], ["get"], resourceNames=["a"])], [rule([""], ["pods"], ["get"])],
     [rule([""], ["pods"], ["get"])]),
    ([{"nonResourceURLs": ["/apis/*"], "verbs": ["get"]}],
     [{"nonResourceURLs": ["/apis/apps"], "verbs": ["get"]}], []),
])
def test_uncovered_is_what_a_grant_holds_beyond_the_granters_rules(owned, granted, missing):
    assert uncovered(owned, granted) == missing


def test_compact_string_is_the_go_format():
    assert compact_string(rule([""], ["pods"], ["get", "list"], resourceNames=["a"])) == (
        '{APIGroups:[""], Resources:["pods"], ResourceNames:["a"], Verbs:["get" "list"]}')
    assert compact_string({"nonResourceURLs": ["/x"], "verbs": ["get"]}) == (
        '{NonResourceURLs:["/x"], Verbs:["get"]}')


SPARK_RULES = [rule([""], ["pods", "configmaps"], ["create", "get"])]
SPARK_ROLE = {"kind": "Role", "metadata": {"name": "spark-driver", "namespace": "x"},
              "rules": SPARK_RULES}
SPARK_BINDING = {"kind": "RoleBinding", "metadata": {"name": "spark-driver", "namespace": "x"},
                 "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": "spark-driver"},
                 "subjects": [{"kind": "ServiceAccount", "name": "spark"}]}
CREATE_ROLE = resource("create", "roles", "x", group=RBAC_GROUP)
CREATE_BINDING = resource("create", "rolebindings", "x", group=RBAC_GROUP)
RUN_GROUPS = '["system:serviceaccounts" "system:serviceaccounts:mlci" "system:authenticated"]'


def run_policy(*rules: dict, extra: tuple[dict, ...] = ()) -> Policy:
    return Policy.from_objects([cluster_role("run", *rules),
                                binding("run", None, "ClusterRole", "run", SA_RUN), *extra])


@pytest.mark.parametrize("policy, attrs, obj, refusal", [
    # Holding what the Role grants: allowed, however the holding is split.
    (run_policy(rule([""], ["pods"], ["*"]), rule([""], ["configmaps"], ["create", "get"])),
     CREATE_ROLE, SPARK_ROLE, None),
    (run_policy(rule([""], ["pods"], ["create", "get"])), CREATE_ROLE, SPARK_ROLE,
     'roles.rbac.authorization.k8s.io "spark-driver" is forbidden: user '
     f'"system:serviceaccount:mlci:mlci-run" (groups={RUN_GROUPS}) is attempting to grant RBAC '
     'permissions not currently held:\n{APIGroups:[""], Resources:["configmaps"], '
     'Verbs:["create" "get"]}'),
    # `escalate` on roles instead of holding: allowed.
    (run_policy(rule([RBAC_GROUP], ["roles"], ["escalate"])), CREATE_ROLE, SPARK_ROLE, None),
    # ... but not `escalate` scoped by name: a create names nothing yet.
    (run_policy(rule([RBAC_GROUP], ["roles"], ["escalate"], resourceNames=["spark-driver"])),
     CREATE_ROLE, SPARK_ROLE, "is attempting to grant RBAC permissions not currently held"),
    # A binding: holding the Role's rules, or `bind` on it by name.
    (run_policy(rule([""], ["pods", "configmaps"], ["*"]), extra=(SPARK_ROLE,)),
     CREATE_BINDING, SPARK_BINDING, None),
    (run_policy(rule([RBAC_GROUP], ["roles"], ["bind"], resourceNames=["spark-driver"]),
                extra=(SPARK_ROLE,)), CREATE_BINDING, SPARK_BINDING, None),
    (run_policy(rule([RBAC_GROUP], ["roles"], ["bind"], resourceNames=["other"]),
                extra=(SPARK_ROLE,)), CREATE_BINDING, SPARK_BINDING,
     'rolebindings.rbac.authorization.k8s.io "spark-driver" is forbidden: user '
     f'"system:serviceaccount:mlci:mlci-run" (groups={RUN_GROUPS}) is attempting to grant RBAC '
     'permissions not currently held:\n{APIGroups:[""], Resources:["configmaps"], '
     'Verbs:["create" "get"]}\n{APIGroups:[""], Resources:["pods"], Verbs:["create" "get"]}'),
    # A binding to a Role that does not exist (yet) is a bad request, not a grant.
    (run_policy(), CREATE_BINDING, SPARK_BINDING,
     'role.rbac.authorization.k8s.io "spark-driver" not found'),
])
def test_roles_and_bindings_grant_only_what_their_author_holds(policy, attrs, obj, refusal):
    denial = escalation_denial(policy, RUN, attrs, None, obj)
    if refusal is None:
        assert denial is None
    else:
        assert denial is not None and refusal in denial.message, denial


def test_an_escalation_refusal_is_a_403_naming_the_object():
    denial = escalation_denial(run_policy(), RUN, CREATE_ROLE, None, SPARK_ROLE)
    assert denial is not None
    assert (denial.code, denial.reason, denial.details) == (
        403, "Forbidden", {"name": "spark-driver", "group": RBAC_GROUP, "kind": "roles"})
    missing = escalation_denial(run_policy(), RUN, CREATE_BINDING, None, SPARK_BINDING)
    assert missing is not None and (missing.code, missing.reason) == (400, "BadRequest")


def test_system_masters_and_garbage_collection_writes_are_never_checked():
    assert escalation_denial(run_policy(), ADMIN, CREATE_ROLE, None, SPARK_ROLE) is None
    held = {**SPARK_ROLE, "metadata": {**SPARK_ROLE["metadata"], "finalizers": ["x"]}}
    update = resource("update", "roles", "x", group=RBAC_GROUP, name="spark-driver")
    assert escalation_denial(run_policy(), RUN, update, SPARK_ROLE, held) is None
    relabelled = {**SPARK_ROLE, "metadata": {**SPARK_ROLE["metadata"], "labels": {"a": "b"}}}
    assert escalation_denial(run_policy(), RUN, update, SPARK_ROLE, relabelled) is not None


def test_a_cluster_role_is_checked_against_cluster_wide_rules_only():
    namespaced = Policy.from_objects([role("all", "x", rule(["*"], ["*"], ["*"])),
                                      binding("all", "x", "Role", "all", SA_RUN)])
    create = resource("create", "clusterroles", group=RBAC_GROUP)
    cluster_wide = cluster_role("pod-reader", rule([""], ["pods"], ["get"]))
    assert escalation_denial(namespaced, RUN, create, None, cluster_wide) is not None
