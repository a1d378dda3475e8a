#!/usr/bin/env bash
# Sets up, then runs every partition of the example registry on the local provider through the
# Dagster instance at $DAGSTER_HOME (default: ./.dagster_home) and prints the report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/install-chromium.sh  # python-train's run page is checked in a browser
# As an activated venv would: the example's image build finds the venv's python and uv.
export PATH="$PWD/.venv/bin:$PATH"
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
.venv/bin/mlci validate
.venv/bin/mlci run "$@"
