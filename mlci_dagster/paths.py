"""Where the registry and the harness's own files live: both come from the environment."""

from __future__ import annotations

import os
from pathlib import Path

REGISTRY_ENV = "MLCI_REGISTRY"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_REGISTRY = EXAMPLES / "ml-platform"  # the demo: MLflow, Ray and Spark
LOCAL_EXAMPLE = EXAMPLES / "local"  # a small platform of Python's own servers


# Where `mlci` keeps the history when DAGSTER_HOME is not set: beside where it runs.
DEFAULT_DAGSTER_HOME = ".dagster_home"
DAGSTER_URL_ENV = "MLCI_DAGSTER_URL"
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"


def ui_base_url(configured: str | None = None) -> str:
    """Where people open the Dagster UI, for links to runs: `$MLCI_DAGSTER_URL`, else the
    registry's `ui_base_url` (`configured`), else the local default."""
    return os.environ.get(DAGSTER_URL_ENV) or configured or DEFAULT_DAGSTER_URL


def registry_path() -> Path:
    """`$MLCI_REGISTRY`, else the example registry beside the package."""
    return Path(os.environ.get(REGISTRY_ENV) or EXAMPLE_REGISTRY)


def run_log_dir(home: Path, run_id: str) -> Path:
    """Logs of one run that belong to no sandbox: its worker's output, a stage's own error."""
    return home / "logs" / "runs" / run_id


def mlci_home() -> Path:
    """`$DAGSTER_HOME/mlci`: images, sandboxes, logs and the ledger, beside the Dagster history."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise RuntimeError(
            "DAGSTER_HOME is not set: set it to a directory that keeps the run history, "
            "e.g. export DAGSTER_HOME=$PWD/.dagster_home"
        )
    return Path(home) / "mlci"
