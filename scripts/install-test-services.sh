#!/usr/bin/env bash
# Installs the system services the tests run for real: Debian's `docker-registry` (the CNCF
# distribution registry, /usr/bin/docker-registry), `openssh-server` and `chromium`. Idempotent; run as root on a fresh machine.
# The tests start their own registry on loopback, so a service apt may have started is stopped.
set -euo pipefail
if [ ! -x /usr/bin/docker-registry ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker-registry > /dev/null
fi
# Stop and disable the Debian service wherever an init system runs it; no-op in a container.
if command -v systemctl > /dev/null && systemctl is-system-running > /dev/null 2>&1; then
  systemctl disable --now docker-registry > /dev/null 2>&1 || true
elif command -v service > /dev/null; then
  service docker-registry stop > /dev/null 2>&1 || true
fi
"$(dirname "$0")/install-chromium.sh"  # the browser checks of ui_smoke
[ -x /usr/sbin/sshd ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server > /dev/null; }  # the TPU tests' sshd
/usr/bin/docker-registry --version
