#!/usr/bin/env bash
# Sets up, then lints and runs the test suite (real processes, real HTTP, real Dagster instances,
# a real OCI registry, moto's AWS servers, a real Dagster daemon and webserver).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# As an activated venv would: the example's image build finds the venv's python and uv.
export PATH="$PWD/.venv/bin:$PATH"
if [ "$(id -u)" = 0 ]; then
  scripts/install-test-services.sh > /dev/null
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
