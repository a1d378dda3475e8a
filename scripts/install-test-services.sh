#!/usr/bin/env bash
# Installs the system services the tests run for real: Debian's `docker-registry` (the CNCF
# distribution registry, /usr/bin/docker-registry), `openssh-server`, `chromium`,
# `kubernetes-client` and `junit5`. Idempotent; run as root on a fresh machine.
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
# Real kubectls against the Kubernetes emulator: the one on PATH (1.27 or later; this machine's
# kind ships the Google Cloud CLI's), and Debian's kubernetes-client (1.20), unpacked beside it
# rather than installed, since its /usr/bin/kubectl would clash with the first.
DEBIAN_KUBECTL_DIR=/opt/debian-kubernetes-client
if [ ! -x "$DEBIAN_KUBECTL_DIR/usr/bin/kubectl" ]; then
  apt-get update -qq
  work="$(mktemp -d)" && chmod 755 "$work"  # apt downloads as _apt
  (cd "$work" && apt-get download -qq kubernetes-client > /dev/null)
  dpkg -x "$work"/kubernetes-client_*.deb "$DEBIAN_KUBECTL_DIR"
  rm -rf "$work"
fi
# JUnit 5's console launcher: a real JVM producer of the JUnit XML that pipelines report.
[ -f /usr/share/java/junit-platform-console-standalone.jar ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq junit5 > /dev/null; }
/usr/bin/docker-registry --version
