#!/usr/bin/env bash
# Creates .venv and installs mlci-dagster with its test tools. Idempotent; needs only Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.mlci-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing mlci-dagster into .venv (log: .venv/setup.log) ..."
  # uv resolves and installs the same pins as pip, several times faster.
  if ! { .venv/bin/python -m pip install --upgrade pip uv \
         && .venv/bin/python -m uv pip install --compile-bytecode --python .venv/bin/python \
              -e '.[dev]'; } \
       > .venv/setup.log 2>&1; then
    tail -30 .venv/setup.log
    exit 1
  fi
  touch "$stamp"
fi
