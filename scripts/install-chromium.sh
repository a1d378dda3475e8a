#!/usr/bin/env bash
# Installs Debian's Chromium, which ui_smoke's browser checks drive through Playwright (no
# browser is downloaded). Idempotent; needs root. Without it those checks fail as infra and
# `mlci validate` says so.
set -euo pipefail
if command -v chromium > /dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "chromium is not installed (run as root: apt-get install chromium); browser checks fail as infra" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium > /dev/null
