"""Registry validation: every error names the file, the field path and what was expected."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlci_dagster.common.templating import (
    IMAGE_ATTRIBUTES,
    PROVIDES,
    REFERENCE,
    ROOTS,
    iter_references,
)
from mlci_dagster.paths import EXAMPLE_REGISTRY
from mlci_dagster.providers.handle import SandboxHandle, render_context
from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.registry.loader import config_id
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.image import build_image
from mlci_dagster.vocabulary import Launch
from tests.support.registries import PY, config, write_registry

NAME_RULE = ("at most 63 characters: lowercase letters, digits and '-', starting and ending "
             "with a letter or digit")


def problems_of(root: Path) -> list[str]:
    with pytest.raises(RegistryError) as caught:
        load_registry(root)
    return caught.value.problems


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"colour": "red"}, "colour", "unknown key"),
        ({"name": "Bad_Name"}, "name", NAME_RULE),
        ({"name": "a|b"}, "name", NAME_RULE),
        ({"name": "x" * 64}, "name", NAME_RULE),
        ({"engines": ["e1", "oracle"]}, "engines[1]", "unknown engine 'oracle'"),
        ({"timeouts": {"pipeline_runs_s": 0}}, "timeouts.pipeline_runs_s", "greater than 0"),
        ({"pipelines": []}, "pipelines", "at least 1 item"),
        ({"image": {}}, "image", "exactly one of 'ref' or 'build'"),
        ({"pipelines": [{"kind": "command", "name": "p", "command": ["true"], "timeout_s": 90}],
          "timeouts": {"pipeline_runs_s": 60}},
         "pipelines[0].timeout_s", "exceeds timeouts.pipeline_runs_s"),
        ({"pipelines": [{"kind": "command", "name": "p", "command": ["true"], "retries": 2}]},
         "pipelines[0].retries", "unknown key"),
        ({"pipelines": [{"kind": "shell", "name": "p"}]}, "pipelines[0]", "does not match"),
        ({"ui_smoke": {"routes": [{"service": "db", "path": "/"}]}},
         "ui_smoke.routes[0].service", "unknown service 'db'"),
        ({"sandbox": {"services": [{"name": "web", "command": ["x"], "ready": {}}]}},
         "sandbox.services[0].ready", "exactly one of 'http', 'tcp' or 'command'"),
        ({"pipelines": [{"kind": "command", "name": "p", "command": ["${vars.MISSING}"]}]},
         "pipelines[0].command[0]", "unknown engine variable 'MISSING' of 'vars'"),
        ({"pipelines": [{"kind": "command", "name": "p", "command": ["${servics.web.url}"]}]},
         "pipelines[0].command[0]", "unknown root 'servics'"),
    ],
)
def test_bad_config_is_reported_with_file_and_field(tmp_path, overrides, field, expected):
    root = write_registry(tmp_path, [config("good")])
    bad_file = root / "configs" / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(config("bad") | overrides))

    problems = problems_of(root)

    assert any(p.startswith(f"{bad_file}: {field}: ") and expected in p for p in problems), \
        problems


def test_duplicate_names_name_both_files(tmp_path):
    root = write_registry(tmp_path, [config("same")])
    (root / "configs" / "copy.yaml").write_text(yaml.safe_dump(config("same")))

    [problem] = problems_of(root)

    assert "duplicate config name 'same'" in problem
    assert "copy.yaml" in problem and "same.yaml" in problem


def test_invalid_yaml_and_missing_settings_are_reported(tmp_path):
    root = write_registry(tmp_path / "a", [config("ok")])
    (root / "configs" / "broken.yaml").write_text("name: [unclosed\n")
    assert any("broken.yaml: not valid YAML" in p for p in problems_of(root))

    (tmp_path / "b" / "configs").mkdir(parents=True)
    assert problems_of(tmp_path / "b") == [f"{tmp_path / 'b' / 'mlci.yaml'}: missing "
                                           "(the registry's root settings file)"]


def test_bad_engine_name_in_settings(tmp_path):
    root = write_registry(tmp_path, [config("ok")], engines={"Big,Engine": {}})
    assert any("mlci.yaml: engines.Big,Engine" in p for p in problems_of(root))


def test_every_problem_is_reported_at_once(tmp_path):
    root = write_registry(tmp_path, [config("one", colour=1), config("two", shape=2)])
    keys = ("class, description, engines, image, metrics, name, owners, paths, pipelines, "
            "reruns, sandbox, tiers, timeouts, ui_smoke")

    assert problems_of(root) == [
        f"{root / 'configs' / 'one.yaml'}: colour: unknown key 'colour' (expected one of: {keys})",
        f"{root / 'configs' / 'two.yaml'}: shape: unknown key 'shape' (expected one of: {keys})"]


def test_config_id_is_stable_and_changes_with_content(tmp_path):
    first = load_registry(write_registry(tmp_path / "a", [config("c")])).configs["c"].config_id
    again = load_registry(write_registry(tmp_path / "b", [config("c")])).configs["c"].config_id
    changed = load_registry(write_registry(
        tmp_path / "c", [config("c", tiers=["pr"])])).configs["c"].config_id

    assert first == again != changed
    assert re.fullmatch(r"[0-9a-f]{16}", first), first


def test_key_order_does_not_change_the_config_id(tmp_path):
    root = write_registry(tmp_path, [config("c")])
    before = load_registry(root).configs["c"]
    body = yaml.safe_load(before.path.read_text())
    before.path.write_text(yaml.safe_dump(dict(reversed(list(body.items()))), sort_keys=False))

    assert config_id(load_registry(root).configs["c"].config) == before.config_id


def test_partitions_follow_engines_and_tiers(tmp_path):
    engines = {"e1": {}, "e2": {}}
    root = write_registry(tmp_path, [config("all"), config("only", engines=["e2"], tiers=["pr"])],
                          engines=engines)
    registry = load_registry(root)

    assert registry.partitions() == [("all", "e1"), ("all", "e2"), ("only", "e2")]
    assert registry.partitions(tier="nightly") == [("all", "e1"), ("all", "e2")]
    assert registry.partitions(engine="e2", tier="pr") == [("only", "e2")]


def test_example_registry_is_valid():
    from mlci_dagster.paths import EXAMPLE_REGISTRY, LOCAL_EXAMPLE

    ml_matrix = [(config, engine) for config in ("python-train", "ray-train", "spark-features")
                 for engine in ("sqlite", "postgres")]
    assert load_registry(LOCAL_EXAMPLE).partitions() == [
        ("jobs-api", "sqlite"), ("jobs-api", "jsonfile"), ("static-site", "sqlite"),
        ("static-site", "jsonfile")]
    assert load_registry(EXAMPLE_REGISTRY).partitions() == ml_matrix
    on_kubernetes = load_registry(EXAMPLE_REGISTRY.parent / "ml-platform-k8s")
    assert on_kubernetes.partitions() == ml_matrix
    assert {c.config.sandbox.provider for c in on_kubernetes.configs.values()} == {"kubernetes"}


def test_json_schema_is_exported_for_editors(capsys):
    from mlci_dagster.cli import main

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"name", "owners", "image", "pipelines"} <= set(schema["required"])


def test_engine_services_join_the_sandbox_and_may_not_clash(tmp_path):
    db = {"name": "db", "command": ["true"], "ready": {"tcp": True}}
    engines = {"e1": {"services": [db], "variables": {"DB": "${services.db.port}"}}}
    ok = config("ok", ui_smoke={"routes": [{"service": "db", "path": "/"}]})
    root = write_registry(tmp_path / "a", [ok], engines=engines)
    assert load_registry(root).configs["ok"]

    clash = config("clash", sandbox={"services": [db]}, ui_smoke={"routes": []})
    root = write_registry(tmp_path / "b", [clash], engines=engines)
    assert any("'db' is also a service of engine 'e1'" in p for p in problems_of(root))


def test_metric_must_name_a_declared_pipeline_output(tmp_path):
    good = config("good", metrics={"run_id": {"source": "ok.run_id",
                                              "direction": "lower_is_better"}})
    bad = config("bad", metrics={"rmse": {"source": "ok.rmse", "direction": "lower_is_better"}})
    root = write_registry(tmp_path, [good, bad])

    [problem] = problems_of(root)

    assert problem.startswith(f"{root / 'configs' / 'bad.yaml'}: metrics.rmse.source: ")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "x" * 64}, "name"),
        ({"name": "-leading"}, "name"),
        ({"tiers": ["Nightly"]}, "tiers[0]"),
        ({"engines": ["e_1"]}, "engines[0]"),
        ({"sandbox": {"pool": "GPU", "services": []}, "ui_smoke": {}}, "sandbox.pool"),
        ({"sandbox": {"services": [{"name": "Web", "command": ["x"], "ready": {"tcp": True}}]},
          "ui_smoke": {}}, "sandbox.services[0].name"),
        ({"pipelines": [{"kind": "command", "name": "train_model", "command": ["true"]}]},
         "pipelines[0].name"),
        ({"ui_smoke": {"routes": [{"service": "Web", "path": "/"}]}},
         "ui_smoke.routes[0].service"),
    ],
)
def test_every_name_field_says_what_a_name_is(tmp_path, overrides, field):
    root = write_registry(tmp_path, [config("good")])
    (root / "configs" / "bad.yaml").write_text(yaml.safe_dump(config("bad") | overrides))

    problems = problems_of(root)

    assert any(p.startswith(f"{root / 'configs' / 'bad.yaml'}: {field}: ") and NAME_RULE in p
               for p in problems), problems
    assert not any("should match pattern" in p for p in problems), problems


def test_a_bad_engine_or_pool_name_in_settings_says_what_a_name_is(tmp_path):
    root = write_registry(tmp_path, [config("ok")], engines={"Sqlite": {}})
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings | {"pools": {"x" * 64: {"limit": 1}}}))

    problems = problems_of(root)

    assert [p.split(": ")[1] for p in problems if NAME_RULE in p] == [
        "engines.Sqlite.[key]", f"pools.{'x' * 64}.[key]"], problems


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"pipeline": []}, "pipeline", "unknown key 'pipeline' (did you mean 'pipelines'?)"),
        ({"timeouts": {"sandbox": 30}}, "timeouts.sandbox",
         "unknown key 'sandbox' (did you mean 'sandbox_s'?)"),
        ({"pipelines": [{"kind": "command", "name": "p", "command": ["true"],
                         "expect_exitcode": 1}]},
         "pipelines[0].expect_exitcode",
         "unknown key 'expect_exitcode' (did you mean 'expect_exit_code'?)"),
        # The member of the union the `kind` chose: poll_url is a submit_poll field only.
        ({"pipelines": [{"kind": "submit_poll", "name": "p", "submit": {"url": "http://x"},
                         "id_field": "id", "poll_ur": "http://x", "poll_url": "http://x",
                         "success_states": ["ok"]}]},
         "pipelines[0].poll_ur", "unknown key 'poll_ur' (did you mean 'poll_url'?)"),
        ({"pipelines": [{"kind": "submit_poll", "name": "p", "id_field": "id",
                         "submit": {"url": "http://x", "jsn": {}}, "poll_url": "http://x",
                         "success_states": ["ok"]}]},
         "pipelines[0].submit.jsn", "unknown key 'jsn' (did you mean 'json'?)"),
        ({"sandbox": {"services": [{"name": "web", "command": ["x"], "ready": {"tcp": True},
                                    "envs": {}}]}, "ui_smoke": {}},
         "sandbox.services[0].envs", "unknown key 'envs' (did you mean 'env'?)"),
        ({"colour": "red"}, "colour",
         "unknown key 'colour' (expected one of: class, description, "),
    ],
)
def test_unknown_key_suggests_the_nearest_known_one(tmp_path, overrides, field, expected):
    root = write_registry(tmp_path, [config("bad") | overrides])

    problems = problems_of(root)

    assert any(p.startswith(f"{root / 'configs' / 'bad.yaml'}: {field}: {expected}")
               for p in problems), problems


def test_unknown_key_in_settings_suggests_the_nearest_known_one(tmp_path):
    root = write_registry(tmp_path, [config("ok")])
    settings = yaml.safe_load((root / "mlci.yaml").read_text())
    settings["secret"] = ["TOKEN"]
    settings["engines"]["e1"]["variable"] = {}
    settings["history"] = {"stale_after": 12}
    (root / "mlci.yaml").write_text(yaml.safe_dump(settings))

    problems = sorted(p.split(": ", 1)[1] for p in problems_of(root))

    assert problems == [
        "engines.e1.variable: unknown key 'variable' (did you mean 'variables'?)",
        "history.stale_after: unknown key 'stale_after' (did you mean 'stale_after_h'?)",
        "secret: unknown key 'secret' (did you mean 'secrets'?)",
    ]


def kubernetes_sandbox(**fields):
    return {"provider": "kubernetes", "manifests": ["k8s/app.yaml"]} | fields


K8S_JOB = {"kind": "k8s_job", "name": "train", "manifest": "k8s/job.yaml"}


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"sandbox": {"provider": "nomad"}}, "sandbox.provider",
         "unknown provider 'nomad' (expected one of: local, kubernetes"),
        ({"sandbox": kubernetes_sandbox(manifest=["k8s/app.yaml"])}, "sandbox.manifest",
         "unknown key 'manifest' (did you mean 'manifests'?)"),
        # A local sandbox's field on a Kubernetes sandbox is unknown there.
        ({"sandbox": kubernetes_sandbox(services=[{"name": "web", "command": ["x"],
                                                   "ready": {"tcp": True}}])},
         "sandbox.services[0].command", "unknown key 'command'"),
        ({"sandbox": {"services": [], "manifests": ["k8s/app.yaml"]}}, "sandbox.manifests",
         "unknown key 'manifests'"),
        ({"sandbox": kubernetes_sandbox(ready=[{"kind": "RayCluster", "name": "rc"}])},
         "sandbox.ready[0]", "apiVersion: required for kind 'RayCluster'"),
        ({"sandbox": kubernetes_sandbox(ready=[{"kind": "Deployment", "selector": "app=x"}])},
         "sandbox.ready[0]", "selector: only for kind Pod"),
        ({"sandbox": kubernetes_sandbox(cluster={"create": "k3d"})}, "sandbox.cluster",
         "name: required when 'create' is set"),
        ({"sandbox": kubernetes_sandbox(manifests=["k8s/missing.yaml"])},
         "sandbox.manifests[0]", "file 'k8s/missing.yaml' not found under the registry root"),
        ({"sandbox": kubernetes_sandbox(), "pipelines": [K8S_JOB | {"manifest": "k8s/no.yaml"}]},
         "pipelines[0].manifest", "file 'k8s/no.yaml' not found"),
        ({"pipelines": [K8S_JOB]}, "pipelines[0].kind",
         "'k8s_job' runs only in a 'kubernetes' sandbox (sandbox.provider is 'local')"),
        ({"sandbox": kubernetes_sandbox(), "pipelines": [
            {"kind": "k8s_resource", "name": "ray", "manifest": "k8s/job.yaml",
             "status_field": "status.jobStatus", "success_states": []}]},
         "pipelines[0].success_states", "at least 1 item"),
    ],
)
def test_kubernetes_fields_are_validated_with_file_and_field(tmp_path, overrides, field,
                                                             expected):
    root = write_registry(tmp_path, [config("bad") | overrides])
    (root / "k8s").mkdir()
    (root / "k8s" / "app.yaml").write_text("kind: ConfigMap\n")
    (root / "k8s" / "job.yaml").write_text("kind: Job\n")

    problems = problems_of(root)

    assert any(p.startswith(f"{root / 'configs' / 'bad.yaml'}: {field}: ") and expected in p
               for p in problems), problems


def test_a_cluster_cli_missing_on_this_machine_is_a_validation_error(tmp_path, monkeypatch):
    root = write_registry(tmp_path, [config("k", ui_smoke={}, sandbox=kubernetes_sandbox(
        cluster={"create": "kind", "name": "mlci"}))])
    (root / "k8s").mkdir()
    (root / "k8s" / "app.yaml").write_text("kind: ConfigMap\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))

    assert problems_of(root) == [
        f"{root / 'configs' / 'k.yaml'}: sandbox.cluster.create: 'kind' is not installed on "
        "this machine (expected on PATH, to create the cluster for each run)"]

    (tmp_path / "empty-bin").mkdir()
    (tmp_path / "empty-bin" / "kind").write_text("#!/bin/sh\n")
    (tmp_path / "empty-bin" / "kind").chmod(0o755)
    assert load_registry(root).configs["k"].config.sandbox.cluster.create == "kind"


def test_a_config_without_sandbox_gets_the_local_provider(tmp_path):
    root = write_registry(tmp_path, [config("plain")])

    assert load_registry(root).configs["plain"].config.sandbox.provider == "local"


def test_a_harness_upgrade_keeps_every_config_id():
    """Ids as the harness computed them before reservations existed (examples/local): a field
    added later with nothing set in it must not make every test look changed in the history."""
    from mlci_dagster.paths import LOCAL_EXAMPLE

    ids = {name: c.config_id for name, c in load_registry(LOCAL_EXAMPLE).configs.items()}

    assert ids == {"jobs-api": "ba95230a636cb54c", "static-site": "4153b77d99f178b6"}


@pytest.mark.parametrize(
    ("route", "field", "expected"),
    [
        ({"kind": "browser", "service": "web", "wait_for": {}}, "ui_smoke.routes[0].wait_for",
         "expected exactly one of 'selector' or 'text'"),
        ({"kind": "browser", "service": "web", "wait_for": {"text": "ok"},
          "allow_console": ["(unclosed"]}, "ui_smoke.routes[0].allow_console",
         "[0]: not a regular expression"),
        ({"kind": "browser", "service": "web"}, "ui_smoke.routes[0].wait_for", "Field required"),
        ({"kind": "browser", "service": "web", "wait_for": {"text": "ok"}, "json_equals": {}},
         "ui_smoke.routes[0].json_equals", "unknown key"),
        ({"kind": "grpc", "service": "web"}, "ui_smoke.routes[0]",
         "expected kind http or browser"),
        ({"kind": "http", "service": "Web"}, "ui_smoke.routes[0].service", NAME_RULE),
    ],
)
def test_browser_routes_are_validated_with_file_and_field(tmp_path, route, field, expected):
    root = write_registry(tmp_path, [config("good")])
    bad_file = root / "configs" / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(config("bad", ui_smoke={"routes": [route]})))

    problems = problems_of(root)

    assert any(p.startswith(f"{bad_file}: {field}: ") and expected in p for p in problems), \
        problems


# --- references that can never resolve ------------------------------------------------------


def served_by(*words: str) -> dict[str, Any]:
    """The sandbox of one local service `web` whose command is `words`."""
    return {"services": [{"name": "web", "command": list(words), "ready": {"tcp": True}}]}


def run(*words: str, name: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"kind": "command", "name": name, "command": list(words)} | fields


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"pipelines": [run("train", "${image.pth}/train.py")]}, "pipelines[0].command[1]",
         "${image.pth}: unknown attribute 'pth' of 'image' (did you mean 'path'?)"),
        ({"sandbox": served_by("serve", "--root", "${sandbox.workdr}")},
         "sandbox.services[0].command[2]",
         "${sandbox.workdr}: unknown attribute 'workdr' of 'sandbox' (did you mean 'workdir'?)"),
        ({"ui_smoke": {"routes": [{"service": "web", "path": "/?port=${services.web.prot}"}]}},
         "ui_smoke.routes[0].path", "${services.web.prot}: unknown attribute 'prot' of "
         "'services.web' (did you mean 'port'?)"),
        ({"pipelines": [run("check", env={"DIR": "${sandbox.workdir.x}"})]},
         "pipelines[0].env.DIR", "${sandbox.workdir.x}: too deep: 'sandbox.workdir' is a "
         "value, without attribute 'x' (expected ${sandbox.workdir})"),
        ({"pipelines": [run("check", "${config.name}")]}, "pipelines[0].command[1]",
         "${config.name}: too deep: 'config' is a value, without attribute 'name' "
         "(expected ${config})"),
        ({"sandbox": served_by("serve", "${port.x}")}, "sandbox.services[0].command[1]",
         "${port.x}: too deep: 'port' is a value, without attribute 'x' (expected ${port})"),
        ({"pipelines": [run("check", "${sandbox}")]}, "pipelines[0].command[1]",
         "${sandbox}: incomplete: expected ${sandbox.<attribute>}, one of: id, workdir"),
        ({"pipelines": [run("check", "${services.wbe.url}")]}, "pipelines[0].command[1]",
         "${services.wbe.url}: unknown service 'wbe' of 'services' (did you mean 'web'?)"),
        ({"pipelines": [run("check", "${vars.STOR}")]}, "pipelines[0].command[1]",
         "${vars.STOR}: unknown engine variable 'STOR' of 'vars' (did you mean 'STORE'?)"),
        # What exists only for another kind of image, or only in other fields.
        ({"pipelines": [run("check", "${image.built_at}")]}, "pipelines[0].command[1]",
         "${image.built_at}: attribute 'built_at' of 'image' does not exist with image.ref "
         "(only with image.build.command, image.build.codebuild)"),
        ({"image": {"build": {"command": ["make", "${sandbox.workdir}"],
                              "inputs": ["mlci.yaml"]}}}, "image.build.command[1]",
         "${sandbox.workdir}: root 'sandbox' does not exist before the image is built "
         "(only ${env.NAME} does)"),
        ({"sandbox": served_by("serve", "--after", "${outputs.ok.run_id}")},
         "sandbox.services[0].command[2]", "${outputs.ok.run_id}: root 'outputs' is only in "
         "pipelines (the outputs of those before) and ui_smoke"),
        ({"pipelines": [run("echo", "${outputs.ok.run_id}", outputs={"run_id": "(.*)"})]},
         "pipelines[0].command[1]", "${outputs.ok.run_id}: pipeline 'ok' of 'outputs' has not "
         "run yet here (outputs come from the pipelines before)"),
        ({"pipelines": [run("check", "${id}")]}, "pipelines[0].command[1]",
         "${id}: root 'id' is only in a submit_poll pipeline's poll_url and logs_url"),
        ({"ui_smoke": {"routes": [{"service": "web", "path": "/${port}"}]}},
         "ui_smoke.routes[0].path", "${port}: root 'port' is only in a local service's own "
         "definition (its command, env and ready.command)"),
    ],
)
def test_a_reference_that_can_never_resolve_names_file_field_and_nearest_name(
        tmp_path, overrides, field, expected):
    root = write_registry(tmp_path, [config("bad") | overrides])

    problems = problems_of(root)

    assert f"{root / 'configs' / 'bad.yaml'}: {field}: {expected}" in problems, problems


@pytest.mark.parametrize(
    ("engine", "field", "expected"),
    [
        ({"variables": {"STORE": "${sandbox.workdr}/db"}}, "engines.e1.variables.STORE",
         "${sandbox.workdr}: unknown attribute 'workdr' of 'sandbox' (did you mean 'workdir'?)"),
        ({"variables": {"HOST": "db", "URL": "http://${vars.HOST}"}}, "engines.e1.variables.URL",
         "${vars.HOST}: root 'vars' does not exist here (engine variables are rendered before "
         "any is set)"),
        ({"services": [{"name": "db", "command": ["${image.pth}/db", "${port}"],
                        "ready": {"tcp": True}}]}, "engines.e1.services[0].command[0]",
         "${image.pth}: unknown attribute 'pth' of 'image' (did you mean 'path'?)"),
        ({"variables": {"DB": "${services.db.url}"}}, "engines.e1.variables.DB",
         "${services.db.url}: unknown service 'db' of 'services' (expected one of: web)"),
    ],
)
def test_a_reference_in_an_engine_that_can_never_resolve_names_mlci_yaml_and_field(
        tmp_path, engine, field, expected):
    root = write_registry(tmp_path, [config("ok")], engines={"e1": engine})

    problems = problems_of(root)

    assert problems == [f"{root / 'mlci.yaml'}: {field}: {expected}"]


def test_a_reference_in_a_manifest_that_can_never_resolve_names_the_manifest_and_field(
        tmp_path):
    job = K8S_JOB | {"outputs": {"run_id": "run_id=(.*)"}}
    body = config("bad", sandbox=kubernetes_sandbox(), pipelines=[job], ui_smoke={})
    root = write_registry(tmp_path, [body], engines={
        "e1": {"variables": {"STORE": "db"}, "manifests": ["k8s/db.yaml"]}})
    (root / "k8s").mkdir()
    (root / "k8s" / "db.yaml").write_text("kind: Pod\nspec: {image: '${image.digst}'}\n")
    (root / "k8s" / "app.yaml").write_text(
        "kind: ConfigMap\ndata: {store: '${vars.STORE}'}\n---\n"
        "kind: Deployment\nspec: {image: '${image.ref}', run: '${outputs.train.run_id}'}\n")
    (root / "k8s" / "job.yaml").write_text("kind: Job\nspec: {dir: '${sandbox.workdr}'}\n")
    bad = root / "configs" / "bad.yaml"

    problems = problems_of(root)

    assert problems == [
        f"{bad}: sandbox.manifests[0]: k8s/app.yaml: document 2: spec.run: "
        "${outputs.train.run_id}: root 'outputs' is only in pipelines (the outputs of those "
        "before) and ui_smoke",
        f"{bad}: pipelines[0].manifest: k8s/job.yaml: document 1: spec.dir: ${{sandbox.workdr}}: "
        "unknown attribute 'workdr' of 'sandbox' (did you mean 'workdir'?)",
        f"{root / 'mlci.yaml'}: engines.e1.manifests[0]: k8s/db.yaml: document 1: spec.image: "
        "${image.digst}: unknown attribute 'digst' of 'image' (did you mean 'digest'?)",
    ]


def test_valid_references_in_every_section_load(tmp_path):
    engines = {
        "e1": {"variables": {"STORE": "${sandbox.workdir}/db", "WEB": "${services.web.url}",
                             "IMAGE": "${image.ref}", "TOKEN": "${env.MLCI_TOKEN}"},
               "services": [{"name": "db", "command": ["${image.path}/db", "${port}",
                                                       "${vars.STORE}"],
                             "ready": {"command": ["probe", "${port}"]}}]},
        "e2": {"variables": {"MODEL": "iris"}},
        "e3": {"variables": {"DB": "postgres"}, "manifests": ["k8s/db.yaml"]},
    }
    web = {"name": "web", "command": ["serve", "${port}", "${sandbox.workdir}"],
           "env": {"DB": "${services.db.url}", "STORE": "${vars.STORE}",
                   "BUILT": "${image.built_at}"},
           "ready": {"command": ["probe", "${services.web.host}:${port}"]}}
    job = {"kind": "submit_poll", "name": "job", "id_field": "id", "success_states": ["ok"],
           "submit": {"url": "${services.web.url}/jobs?after=${outputs.ok.run_id}",
                      "json": {"image": "${image.digest}", "sandbox": "${sandbox.id}"}},
           "poll_url": "${services.web.url}/jobs/${id}", "logs_url": "${services.db.url}/${id}"}
    local = config(
        "local", engines=["e1"], image={"build": {"command": ["make"], "inputs": ["mlci.yaml"]}},
        sandbox={"services": [web]},
        pipelines=[run("train", "${config}", "${engine}", "${env.HOME}",
                       outputs={"run_id": "run_id=(.*)"}),
                   job, run("check", "${outputs.job.id}", "${outputs.ok.run_id}", name="check")],
        ui_smoke={"routes": [{"service": "web", "path": "/jobs/${outputs.job.id}",
                              "contains": ["${config}"], "json_equals": {"id": "${engine}"}}]})
    served = config(
        "served", engines=["e2"], ui_smoke={},
        sandbox={"provider": "aws-sagemaker", "environment": {"RUN": "${sandbox.id}"},
                 "execution_role_arn": "${env.MLCI_ROLE_ARN}"},
        pipelines=[{"kind": "sagemaker_invoke", "name": "predict",
                    "payload": {"model": "${vars.MODEL}"}}],
        metrics={"latency": {"source": "predict.latency_ms", "direction": "lower_is_better"}})
    on_kubernetes = config(
        "on-kubernetes", engines=["e3"], ui_smoke={},
        sandbox=kubernetes_sandbox(services=[{"name": "api", "service": "api", "port": 80}]),
        pipelines=[K8S_JOB | {"outputs": {"run_id": "run_id=(.*)"}},
                   run("after", "${outputs.train.run_id}", name="after")])
    root = write_registry(tmp_path, [local, served, on_kubernetes], engines=engines)
    (root / "k8s").mkdir()
    (root / "k8s" / "db.yaml").write_text("kind: Pod\nspec: {image: '${image.ref}', "
                                          "db: '${vars.DB}'}\n")
    (root / "k8s" / "app.yaml").write_text("kind: Deployment\nspec: {url: '${services.api.url}', "
                                           "sandbox: '${sandbox.id}'}\n")
    (root / "k8s" / "job.yaml").write_text("kind: Job\nspec: {image: '${image.digest}'}\n")

    assert sorted(load_registry(root).configs) == ["local", "on-kubernetes", "served"]


EXAMPLES = sorted(p.parent for p in EXAMPLE_REGISTRY.parent.glob("*/mlci.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_every_example_registry_is_valid_and_each_of_its_references_is_checked(
        tmp_path, example):
    assert load_registry(example).configs
    copy = shutil.copytree(example, tmp_path / example.name)
    misspelled = set()  # every reference but ${env.NAME} (any name may be set), one letter more
    for file in [copy / "mlci.yaml", *sorted((copy / "configs").glob("*.yaml"))]:
        text = REFERENCE.sub(lambda m: m[0] if m[1].startswith("env.") else f"${{{m[1]}x}}",
                             file.read_text())
        file.write_text(text)
        misspelled |= {(str(file), ref) for ref in iter_references(yaml.safe_load(text))
                       if not ref.startswith("env.")}

    problems = problems_of(copy) if misspelled else []

    # Each problem reads `file: field: ${reference}: why`.
    assert {(p.split(": ")[0], p.split("${")[1].split("}")[0]) for p in problems} == misspelled


def test_the_declared_roots_are_what_a_sandbox_context_holds():
    handle = SandboxHandle("sb-1", "local", "c", "e1", "run-1", 0.0, 60.0, "/work", "/logs",
                           endpoints={"web": "http://127.0.0.1:8080"}, variables={"V": "1"})

    context = render_context(handle, {"HOME": "/root"})

    # `image` and `outputs` are what the stages add, `port` and `id` what a field adds.
    assert set(context) == ROOTS - {"image", "outputs", "port", "id"}
    assert set(context["sandbox"]) == set(PROVIDES["sandbox"])
    assert set(context["services"]["web"]) == set(PROVIDES["services"]["<service>"])


@pytest.mark.parametrize(
    ("image", "source"),
    [({"ref": "example.test/platform:nightly"}, "image.ref"),
     ({"build": {"command": [PY, "-c", "pass"], "inputs": ["mlci.yaml"]}},
      "image.build.command")],
)
def test_the_declared_image_attributes_are_what_the_image_stage_gives(tmp_path, image, source):
    registry = load_registry(write_registry(tmp_path / "reg", [config("c", image=image)]))
    ctx = LifecycleContext.create(registry, "c", "e1", "run-1", tmp_path / "home",
                                  launch=Launch(image_digest="sha256:" + "0" * 64))

    outcome = build_image(ctx)

    assert outcome.passed, outcome.error_summary
    assert set(outcome.details.attributes()) == set(IMAGE_ATTRIBUTES[source])
