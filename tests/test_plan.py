"""`mlci plan`: the partitions a change needs, on real git repositories, with tiers and
equivalence classes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlci_dagster.registry import RegistryError, load_registry
from mlci_dagster.registry.loader import config_id
from mlci_dagster.registry.models import TestConfig
from mlci_dagster.tiers.plan import (
    BEHAVIOUR_NEUTRAL,
    PlanError,
    Trigger,
    equivalence_class,
    glob_matcher,
    plan_changes,
    plan_revisions,
)
from tests.support.git_repo import commit, git
from tests.support.registries import PY, command_pipeline, config

TIERS = {"nightly": {"trigger": "nightly"},
         "pr": {"trigger": "pull_request", "selection": "changed", "representatives": True}}




def write_registry(root: Path, configs: list[dict[str, Any]], **settings: Any) -> Path:
    files = registry_files(configs, **settings)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def registry_files(configs: list[dict[str, Any]], prefix: str = "", **settings: Any
                   ) -> dict[str, str]:
    body = {"engines": {"e1": {}, "e2": {}}, **settings}
    return {f"{prefix}mlci.yaml": yaml.safe_dump(body),
            **{f"{prefix}configs/{c['name']}.yaml": yaml.safe_dump(c) for c in configs}}


def keys(plan) -> set[str]:
    return {p.key for p in plan.partitions}


REGISTRY = "ci/registry/"
BUILT = {"build": {"command": [PY, "platform/build.py"], "inputs": ["platform/*.py"]}}


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A repository with the registry in ci/registry/ and one commit per kind of change."""
    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q", "-b", "main")
    configs = [config("alpha", paths=["src/alpha/**"]),
               config("beta", engines=["e1"], image=BUILT),
               config("gamma", pipelines=[command_pipeline("ok", "print('gamma')")],
                      ui_smoke={"routes": []})]
    commits = {"start": commit(repo, "start", {
        **registry_files(configs, prefix=REGISTRY), f"{REGISTRY}platform/build.py": "# v1\n",
        "src/alpha/model.py": "v1\n", "src/other/util.py": "v1\n",
        "mlci_dagster/core.py": "v1\n", "README.md": "v1\n"})}
    gamma = yaml.safe_dump(configs[2] | {"description": "now described"})
    for name, path, text in [("config_file", f"{REGISTRY}configs/gamma.yaml", gamma),
                             ("paths_glob", "src/alpha/model.py", "v2\n"),
                             ("image_input", f"{REGISTRY}platform/build.py", "# v2\n"),
                             ("settings", f"{REGISTRY}mlci.yaml",
                              (repo / f"{REGISTRY}mlci.yaml").read_text() + "# a comment\n"),
                             ("harness", "mlci_dagster/core.py", "v2\n")]:
        commits[name] = commit(repo, name, {path: text})
    commits["unrelated"] = commit(repo, "unrelated", {"README.md": "v2\n",
                                                      "src/other/util.py": "v2\n"})
    return repo, commits


EVERY = {"alpha|e1", "alpha|e2", "beta|e1", "gamma|e1", "gamma|e2"}


@pytest.mark.parametrize(("base", "head", "expected"), [
    ("start", "config_file", {"gamma|e1", "gamma|e2"}),
    ("config_file", "paths_glob", {"alpha|e1", "alpha|e2"}),
    ("paths_glob", "image_input", {"beta|e1"}),
    ("image_input", "settings", EVERY),
    ("settings", "harness", EVERY),
    ("harness", "unrelated", set()),
    ("start", "image_input", {"gamma|e1", "gamma|e2", "alpha|e1", "alpha|e2", "beta|e1"}),
    ("settings", "unrelated", EVERY),
])
def test_each_kind_of_change_selects_exactly_its_partitions(history, base, head, expected):
    repo, commits = history
    registry = load_registry(repo / REGISTRY)

    plan = plan_revisions(registry, commits[base], commits[head])

    assert keys(plan) == expected


def test_the_plan_says_which_path_matched_which_glob(history):
    repo, commits = history
    registry = load_registry(repo / REGISTRY)

    by_glob = plan_revisions(registry, commits["config_file"], commits["paths_glob"])
    by_input = plan_revisions(registry, commits["paths_glob"], commits["image_input"])
    by_file = plan_revisions(registry, commits["start"], commits["config_file"])
    by_settings = plan_revisions(registry, commits["image_input"], commits["settings"])

    assert {t for p in by_glob.partitions for t in p.triggers} == {
        Trigger("alpha", "src/alpha/model.py", "src/alpha/**", "paths[0]")}
    assert {t for p in by_input.partitions for t in p.triggers} == {
        Trigger("beta", "ci/registry/platform/build.py", "ci/registry/platform/*.py",
                "image.build.inputs[0]")}
    assert {t.source for p in by_file.partitions for t in p.triggers} == {"its file"}
    assert by_settings.everything == (
        Trigger(None, "ci/registry/mlci.yaml", "ci/registry/mlci.yaml", "mlci.yaml"),)


def test_a_branch_is_planned_from_its_merge_base_not_from_where_base_is_now(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    start = commit(repo, "start", {**registry_files(
        [config("alpha", paths=["src/alpha/**"]), config("gamma")], prefix=REGISTRY),
        "src/alpha/model.py": "v1\n"})
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "feature", {"src/alpha/model.py": "v2\n"})
    git(repo, "checkout", "-q", "main")
    commit(repo, "main moves on", {f"{REGISTRY}configs/gamma.yaml": yaml.safe_dump(
        config("gamma", description="changed on main"))})
    git(repo, "checkout", "-q", "feature")

    plan = plan_revisions(load_registry(repo / REGISTRY), "main", "feature")

    assert keys(plan) == {"alpha|e1", "alpha|e2"}  # gamma changed on main, not on the branch
    assert plan.revisions.merge_base == start
    assert plan.notes == ()


def test_a_file_moved_out_of_a_glob_still_selects_its_config(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    base = commit(repo, "start", {**registry_files([config("alpha", paths=["src/alpha/**"])]),
                                  "src/alpha/model.py": "a model\n" * 20})
    (repo / "lib").mkdir()
    git(repo, "mv", "src/alpha/model.py", "lib/model.py")
    head = commit(repo, "move", {})

    plan = plan_revisions(load_registry(repo), base, head)

    assert plan.changed == ("lib/model.py", "src/alpha/model.py")
    assert keys(plan) == {"alpha|e1", "alpha|e2"}


def test_an_unknown_revision_is_named(history):
    repo, commits = history
    registry = load_registry(repo / REGISTRY)

    with pytest.raises(PlanError, match="--base: unknown revision 'no-such-branch'"):
        plan_revisions(registry, "no-such-branch", commits["harness"])
    with pytest.raises(PlanError, match="--head: unknown revision 'deadbeef'"):
        plan_revisions(registry, commits["start"], "deadbeef")


def test_a_registry_outside_git_asks_for_repo(tmp_path):
    registry = load_registry(write_registry(tmp_path / "registry", [config("alpha")]))

    with pytest.raises(PlanError, match="not in a git work tree"):
        plan_revisions(registry, "HEAD~1", "HEAD")


def test_repo_diffs_another_repository_matched_by_paths_only(tmp_path):
    registry = load_registry(write_registry(tmp_path / "registry", [
        config("alpha", paths=["src/alpha/**"]), config("gamma")]))
    product = tmp_path / "product"
    product.mkdir()
    git(product, "init", "-q", "-b", "main")
    base = commit(product, "start", {"src/alpha/model.py": "v1\n", "mlci.yaml": "{}\n"})
    head = commit(product, "change", {"src/alpha/model.py": "v2\n", "mlci.yaml": "{a: 1}\n",
                                      "configs/gamma.yaml": "not the registry's\n"})

    plan = plan_revisions(registry, base, head, repo=product)

    assert keys(plan) == {"alpha|e1", "alpha|e2"}
    assert plan.everything == ()  # that repository's mlci.yaml is not the registry's
    assert "is not in" in plan.notes[0]


def test_cli_prints_the_plan_and_its_json(history):
    repo, commits = history
    mlci = [PY, "-m", "mlci_dagster.cli", "--registry", str(repo / REGISTRY), "plan"]

    text = subprocess.run([*mlci, "--base", commits["paths_glob"], "--head",
                           commits["image_input"]], capture_output=True, text=True, check=True)
    as_json = json.loads(subprocess.run(
        [*mlci, "--base", commits["start"], "--head", commits["paths_glob"], "--json"],
        capture_output=True, text=True, check=True).stdout)
    unknown = subprocess.run([*mlci, "--base", "nope"], capture_output=True, text=True)

    assert "beta|e1" in text.stdout and "alpha|" not in text.stdout
    assert ("ci/registry/platform/build.py matches image.build.inputs[0] "
            "'ci/registry/platform/*.py'") in text.stdout
    assert "not at --head" in text.stderr  # the work tree is at a later commit
    assert [p["partition"] for p in as_json["partitions"]] == [
        "alpha|e1", "alpha|e2", "gamma|e1", "gamma|e2"]
    assert as_json["counts"] == {"selected": 4, "tier": 5, "matrix": 5}
    assert as_json["revisions"]["merge_base"] == commits["start"]
    assert unknown.returncode == 2 and "unknown revision 'nope'" in unknown.stderr


# --- select-all globs, tiers, equivalence classes (no git needed) ---------------------------


def test_select_all_on_is_configurable(tmp_path):
    registry = load_registry(write_registry(tmp_path, [config("alpha"), config("gamma")],
                                            plan={"select_all_on": ["harness/**"]}))

    assert keys(plan_changes(registry, ["mlci_dagster/core.py"])) == set()
    assert len(keys(plan_changes(registry, ["harness/a/b.py"]))) == 4


def test_a_changed_engine_manifest_selects_that_engines_partitions(tmp_path):
    engines = {"e1": {"manifests": ["k8s/db.yaml"]}, "e2": {}}
    (tmp_path / "k8s").mkdir()
    (tmp_path / "k8s" / "db.yaml").write_text("{}\n")
    registry = load_registry(write_registry(tmp_path, [config("alpha")], engines=engines))

    assert keys(plan_changes(registry, ["k8s/db.yaml"])) == {"alpha|e1"}


def twins(**second: Any) -> list[dict[str, Any]]:
    """Configs `a` and `b` that differ only in who owns them, what they say and when they run,
    plus `second`'s overrides of b."""
    return [config("a", tiers=["nightly", "pr"]),
            config("b", **{"owners": {"default": "other-team"}, "description": "b",
                           "tiers": ["pr"], "paths": ["src/b/**"], **second})]


def classes(tmp_path: Path, configs: list[dict[str, Any]]) -> dict[str, str]:
    registry = load_registry(write_registry(tmp_path, configs, tiers=TIERS))
    return {name: equivalence_class(c.config) for name, c in registry.configs.items()}


def test_configs_differing_only_in_name_and_owners_share_a_class(tmp_path):
    found = classes(tmp_path, twins())

    assert found["a"] == found["b"]


def test_a_different_pipeline_command_is_another_class(tmp_path):
    found = classes(tmp_path, twins(pipelines=[command_pipeline("ok", "print('other')")]))

    assert found["a"] != found["b"]


def test_an_explicit_class_wins_over_the_fingerprint(tmp_path):
    other = [command_pipeline("ok", "print('other')")]
    found = classes(tmp_path, [*twins(pipelines=other, **{"class": "shared"}),
                               config("c", **{"class": "shared"}), config("d")])

    assert found["b"] == found["c"] == "shared"
    assert found["d"] != found["c"]  # d has c's content, but c names its class


def test_a_config_that_references_its_name_is_its_own_class(tmp_path):
    named = [command_pipeline("ok", "print('${config}')")]
    found = classes(tmp_path, [config("a", pipelines=named), config("b", pipelines=named)])

    assert found["a"] != found["b"]


def test_every_field_outside_the_neutral_list_decides_behaviour():
    fingerprinted = set(TestConfig.model_fields) - BEHAVIOUR_NEUTRAL

    assert fingerprinted == {"image", "sandbox", "pipelines", "ui_smoke", "timeouts"}


def test_a_representatives_tier_runs_the_first_config_of_each_class_per_engine(tmp_path):
    configs = [*twins(), config("c", tiers=["pr"], pipelines=[command_pipeline("ok", "1")])]
    registry = load_registry(write_registry(tmp_path, configs, tiers=TIERS))

    plan = plan_changes(registry, ["src/b/x.py", "configs/c.yaml"], tier="pr")

    assert [(p.key, p.covers) for p in plan.partitions] == [
        ("a|e1", ("a", "b")), ("a|e2", ("a", "b")), ("c|e1", ("c",)), ("c|e2", ("c",))]
    assert {t.config for t in plan.partitions[0].triggers} == {"b"}
    assert (plan.tier_partitions, plan.matrix_partitions) == (6, 6)


def test_a_select_all_change_still_runs_one_partition_per_class(tmp_path):
    registry = load_registry(write_registry(tmp_path, twins(), tiers=TIERS))

    plan = plan_changes(registry, ["mlci.yaml"], tier="pr")

    assert keys(plan) == {"a|e1", "a|e2"}


def test_a_tier_that_selects_all_ignores_the_diff(tmp_path):
    registry = load_registry(write_registry(tmp_path, twins(), tiers=TIERS))

    plan = plan_changes(registry, [], tier="nightly")

    assert keys(plan) == {"a|e1", "a|e2"}  # b is not in the nightly tier
    assert all(p.triggers == () for p in plan.partitions)


def test_an_unknown_tier_is_refused(tmp_path):
    declared = load_registry(write_registry(tmp_path / "a", twins(), tiers=TIERS))
    undeclared = load_registry(write_registry(tmp_path / "b", twins()))

    with pytest.raises(PlanError, match="unknown tier 'weekly'.*: nightly, pr"):
        plan_changes(declared, [], tier="weekly")
    with pytest.raises(PlanError, match="no config names tier 'weekly'.*declares no tiers"):
        plan_changes(undeclared, [], tier="weekly")


def test_without_declared_tiers_a_tier_is_a_free_label_planned_by_change(tmp_path):
    registry = load_registry(write_registry(tmp_path, twins(tiers=["anything"])))

    assert keys(plan_changes(registry, ["src/b/x.py"], tier="anything")) == {"b|e1", "b|e2"}
    assert keys(plan_changes(registry, ["src/b/x.py"], tier="nightly")) == set()


# --- validation ------------------------------------------------------------------------------


def problems_of(root: Path) -> list[str]:
    with pytest.raises(RegistryError) as caught:
        load_registry(root)
    return caught.value.problems


def test_a_config_naming_an_undeclared_tier_names_file_field_and_the_declared_tiers(tmp_path):
    root = write_registry(tmp_path, [config("a", tiers=["pr", "weekly"])], tiers=TIERS)

    assert problems_of(root) == [
        f"{root}/configs/a.yaml: tiers[1]: unknown tier 'weekly' (expected tiers declared in "
        "mlci.yaml: nightly, pr)"]


def test_the_default_tier_must_be_declared_once_tiers_are(tmp_path):
    root = write_registry(tmp_path, [config("a")], tiers={"pr": TIERS["pr"]})

    assert problems_of(root) == [
        f"{root}/configs/a.yaml: tiers: not given, and the default tier 'nightly' is not "
        "declared (expected tiers declared in mlci.yaml: pr)"]


@pytest.mark.parametrize(("tier", "expected"), [
    ({"trigger": "label"}, "tiers.full: label: required with trigger 'label'"),
    ({"trigger": "nightly", "label": "x"}, "tiers.full: label: only with trigger 'label'"),
    ({"trigger": "push"}, "tiers.full.trigger: Input should be 'pull_request', 'merge'"),
    ({"trigger": "merge", "selection": "some"}, "tiers.full.selection: Input should be 'all'"),
    ({"trigger": "merge", "representative": True},
     "tiers.full.representative: unknown key 'representative' (did you mean 'representatives'?)"),
])
def test_a_bad_tier_names_its_field_in_mlci_yaml(tmp_path, tier, expected):
    root = write_registry(tmp_path, [config("a")], tiers={"nightly": TIERS["nightly"],
                                                          "full": tier})

    [problem] = problems_of(root)

    assert problem.startswith(f"{root}/mlci.yaml: {expected}"), problem


def test_a_label_tier_is_valid(tmp_path):
    tiers = {**TIERS, "full": {"trigger": "label", "label": "ci: full matrix"}}
    registry = load_registry(write_registry(tmp_path, [config("a", tiers=["full"])],
                                            tiers=tiers))

    assert registry.settings.tiers["full"].label == "ci: full matrix"


@pytest.mark.parametrize("bad", ["/etc/passwd", "../elsewhere/**", "src/../../x", ""])
def test_paths_must_stay_inside_the_repository(tmp_path, bad):
    root = write_registry(tmp_path, [config("a", paths=["ok/**", bad])])

    [problem] = problems_of(root)

    assert problem.startswith(f"{root}/configs/a.yaml: paths[1]: expected a glob relative to "
                              "the repository root"), problem


def test_paths_and_class_leave_the_config_id_unchanged(tmp_path):
    plain = load_registry(write_registry(tmp_path / "a", [config("a")])).configs["a"]
    scoped = load_registry(write_registry(tmp_path / "b", [config(
        "a", paths=["src/**"], **{"class": "k"})])).configs["a"]
    described = load_registry(write_registry(tmp_path / "c", [config(
        "a", description="other")])).configs["a"]

    assert scoped.config_id == plain.config_id == config_id(plain.config)
    assert described.config_id != plain.config_id


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("src/**", "src/a/b.py", True),
    ("src/**", "srcx/a.py", False),
    ("**/*.py", "a.py", True),
    ("**/*.py", "d/e/a.py", True),
    ("a/**/b.txt", "a/b.txt", True),
    ("a/**/b.txt", "a/x/y/b.txt", True),
    ("*.py", "d/a.py", False),
    ("platform/*", "platform/x.py", True),
    ("platform/*", "platform/d/x.py", False),
    ("file?.txt", "file1.txt", True),
    ("file?.txt", "file/.txt", False),
    ("[ab].py", "b.py", True),
    ("[!ab].py", "c.py", True),
    ("[!ab].py", "a.py", False),
    ("configs/[[]x].yaml", "configs/[x].yaml", True),
    ("configs/a.yaml", "configs/a.yaml", True),
    ("configs/a.yaml", "configs/a.yml", False),
])
def test_globs_match_repository_paths_as_pathlib_does(pattern, path, matches):
    assert glob_matcher(pattern)(path) is matches
