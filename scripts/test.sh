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
if [ "$#" -eq 0 ]; then
  # Two test processes, a file each at a time: most tests wait on processes, servers and
  # daemons rather than on the CPU. Tests that look at the whole machine (`serial`: the named
  # semaphores in /dev/shm) run alone afterwards.
  .venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not serial"
  .venv/bin/python -m pytest -q -m serial
else
  .venv/bin/python -m pytest -q "$@"
fi
