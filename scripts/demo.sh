#!/usr/bin/env bash
# Sets up, then runs every partition of the example registry on the local provider through the
# Dagster instance at $DAGSTER_HOME (default: ./.dagster_home) and prints the report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
.venv/bin/mlci validate
.venv/bin/mlci run "$@"
