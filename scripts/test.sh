#!/usr/bin/env bash
# Sets up, then lints and runs the test suite (real processes, real HTTP, real Dagster instances).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
