#!/usr/bin/env bash
# Runs examples/aws-sagemaker against moto's server on loopback, in one command:
# services on free ports, a DAGSTER_HOME of its own, mlci sync/run/report, everything stopped
# afterwards; exits non-zero unless every run passed. exec: the Python process itself receives
# Ctrl-C, SIGTERM and SIGHUP and stops all it started (tests/support/loopback_cloud.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m tests.support.loopback_cloud aws "$@"
