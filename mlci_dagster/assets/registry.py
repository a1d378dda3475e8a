"""The registry in the Dagster UI: an asset whose `registry_valid` check says which file and
field of the registry is wrong, and which configs are left out for it (registry_sync evaluates
it whenever that changes)."""

import dagster as dg

from mlci_dagster.registry import Registry
from mlci_dagster.resources.mlci import MlciResource

REGISTRY_ASSET = dg.AssetSpec(
    "registry", group_name="operations", kinds={"yaml"},
    description="The registry of test configurations (mlci.yaml and configs/): its "
                "`registry_valid` check names each invalid file and field.",
)
VALID_CHECK = "registry_valid"


def validity(registry: Registry) -> dg.AssetCheckEvaluation:
    """Green when every file is valid; else red, naming each problem (file: field: what was
    expected), the configs left out (they are not run until fixed) and, when mlci.yaml itself
    is invalid, which mlci.yaml stands in for it."""
    left_out = sorted(registry.invalid)
    first = registry.problems[0].removeprefix(f"{registry.root}/") if registry.problems else ""
    more = len(registry.problems) - 1
    description = "every file valid" if not registry.problems else (
        f"{first}" + (f" (and {more} more problem(s))" if more else "") + "; "
        + (f"left out until fixed: {', '.join(left_out)}" if left_out else "no config left out")
        + (f"; mlci.yaml from {registry.settings_from}" if registry.settings_from else ""))
    return dg.AssetCheckEvaluation(
        asset_key=REGISTRY_ASSET.key, check_name=VALID_CHECK, passed=not registry.problems,
        severity=dg.AssetCheckSeverity.ERROR, description=description,
        metadata={"problems": dg.MetadataValue.md("\n".join(f"- `{p}`" for p in registry.problems)
                                                  or "none"),
                  "left_out": dg.MetadataValue.json(left_out)})


@dg.asset_check(asset=REGISTRY_ASSET.key, name=VALID_CHECK,
                description="Every registry file is valid; else each problem, and the configs "
                            "left out until it is fixed.")
def registry_valid(mlci: MlciResource) -> dg.AssetCheckResult:
    """The check as the UI's Execute button runs it (registry_sync evaluates it too)."""
    evaluation = validity(mlci.registry())
    return dg.AssetCheckResult(passed=evaluation.passed, description=evaluation.description,
                               metadata=evaluation.metadata)


REGISTRY_CHECKS = [registry_valid]
