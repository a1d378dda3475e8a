"""A `k8s_job`'s test reports, handed over through the API server alone: a sidecar in the Job's
pod prints them, framed, to its own log when the kubelet stops it, and `fetch_reports` reads
that log (`pods/log`, which the provider already reads) and writes the files back here.

Why this way: the reports are files in the pod, and the ways to reach a pod's files
(`kubectl cp` is exec and tar; port-forward) need an SPDY or WebSocket upgrade of the
connection, which proxies in front of API servers and many clusters' policies refuse, and which
deploy/rbac.yaml does not grant (`pods/exec`, `pods/portforward`). A log read is plain HTTP, and
it outlives the containers: a finished pod's logs stay readable until the pod is deleted.

How: the provider adds to the Job's pod template (`with_report_sidecar`)
- an `emptyDir` volume mounted in every container of the pod at each report path's directory
  (up to its first glob character), so what the Job's containers write there the sidecar sees;
  a volume a container already mounts there is shared instead;
- a native sidecar (an init container with `restartPolicy: Always`, Kubernetes 1.29 and later,
  `REPORT_IMAGE` or the pipeline's `report_image`): it starts before the main containers and
  sleeps; the kubelet stops it (SIGTERM) once they have all ended, pass or fail, and only then
  gives the pod its final phase (since 1.27), so a Job that is Complete or Failed has its
  reports in the log already. On SIGTERM the sidecar's `sh` expands each report path as a shell
  glob (the matching is the shell's: `*`, `?`, `[...]`, no `**`; files only, in the shell's
  sorted order) and prints each file matched as a frame:

      ::mlci-report:: file <index of its path> <bytes> <path>
      <the content in base64, in lines>
      ::mlci-report:: end <exit status of base64>

  (a file larger than MAX_REPORT_BYTES as one `too-large <index> <bytes> <path>` line, without
  its content), then `::mlci-report:: done`, and exits 0. The `ready` line it prints first and
  that `done` line bound the log: a log without them has lost its head or its tail.

Limits: the kubelet rotates a container's log at its `containerLogMaxSize` (10 MiB by default)
and the API serves the current file only, so reports of more than about 7 MiB in all (base64
adds a third) lose the head of the log, which reads as such; the pod must still exist when the
reports are read (a Job deleted at its timeout, or by its `ttlSecondsAfterFinished`, takes its
pods and their logs along); the sidecar runs as the pod's user with no capabilities, so it reads
what that user may read. The sidecar's log is not kept with the pipeline's logs nor in the debug
bundle: base64 would carry a report's secrets past the redactor.
"""

from __future__ import annotations

import base64
import binascii
import copy
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlci_dagster.providers.base import (
    MAX_REPORT_BYTES,
    MAX_REPORT_FILES,
    ReportError,
    report_copy_path,
)
from mlci_dagster.providers.kubernetes import diagnose
from mlci_dagster.providers.kubernetes.client import KubeClient, KubeError
from mlci_dagster.providers.kubernetes.manifests import ManifestError
from mlci_dagster.registry.kubernetes import report_directory

SIDECAR = "mlci-reports"  # the sidecar container's name
VOLUME = "mlci-reports-{}"  # the name of the volume of a report directory, by its order
MARKER = "::mlci-report::"
MAX_BYTES_ENV = "MLCI_REPORT_MAX_BYTES"
MIN_VERSION = (1, 29)  # native sidecars: SidecarContainers, on by default since 1.29
LINES_QUOTED = 3  # stray lines (what a failing command printed) a problem quotes

# The sidecar's program (busybox sh: sh, kill, sleep, wc, tr, base64); "$@" are the report
# paths as globs, $0 the container's name. It traps SIGTERM before it prints or sleeps, so that
# the kubelet's signal, however early, finds the handler.
SCRIPT = f"""\
m='{MARKER}'
sleeper=
send() {{
  trap '' TERM
  [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
  IFS=
  i=0
  for pattern in "$@"; do
    for f in $pattern; do
      [ -f "$f" ] || continue
      size=$(wc -c < "$f" | tr -dc 0-9)
      if [ "${{size:-0}}" -gt "${MAX_BYTES_ENV}" ]; then
        echo "$m too-large $i $size $f"
        continue
      fi
      echo "$m file $i ${{size:-0}} $f"
      base64 "$f"
      echo "$m end $?"
    done
    i=$((i + 1))
  done
  echo "$m done"
  exit 0
}}
trap 'send "$@"' TERM
echo "$m ready $#"
while :; do sleep 3600 & sleeper=$!; wait "$sleeper"; done
"""
HEADER = re.compile(r"(file|too-large) (\d+) (\d+) (/.*)")


# --- the Job's pod -----------------------------------------------------------------------------

def report_directories(patterns: Iterable[str]) -> list[str]:
    """The directories to share for these report paths (rendered), each once, none inside
    another; ManifestError for a path that has none (the registry refuses such paths as
    written, but a reference may render to one)."""
    found: list[str] = []
    for pattern in patterns:
        directory = report_directory(pattern) if pattern.startswith("/") else None
        if directory is None or ".." in pattern.split("/"):
            raise ManifestError(f"report path {pattern!r}: expected an absolute path in the "
                                "pod, in a directory of its own, such as /reports/*.xml")
        found.append(directory)
    kept: list[str] = []
    for directory in sorted(set(found), key=len):
        if not any(directory == k or directory.startswith(f"{k}/") for k in kept):
            kept.append(directory)
    return kept


def with_report_sidecar(job: dict[str, Any], patterns: list[str], image: str
                        ) -> dict[str, Any]:
    """The Job with its pod template holding the report sidecar, reading `patterns` (the report
    paths, rendered) from volumes mounted at their directories in every container of the pod.
    ManifestError when the template cannot take them (a container already named like the
    sidecar, containers mounting different volumes at one of the directories)."""
    body = copy.deepcopy(job)
    name = diagnose.dig(body, "metadata.name", "?")
    pod = body.setdefault("spec", {}).setdefault("template", {}).setdefault("spec", {})
    pod["initContainers"] = list(pod.get("initContainers") or [])
    containers = [*pod["initContainers"], *(pod.get("containers") or [])]
    if any(c.get("name") == SIDECAR for c in containers):
        raise ManifestError(f"Job {name}: a container is named {SIDECAR}, the name of the "
                            "sidecar that hands its reports over: rename it")
    pod["volumes"] = volumes = list(pod.get("volumes") or [])
    sidecar_mounts = []
    for i, directory in enumerate(report_directories(patterns)):
        mounted = {m.get("name") for c in containers for m in c.get("volumeMounts") or []
                   if str(m.get("mountPath", "")).rstrip("/") == directory}
        if len(mounted) > 1:
            raise ManifestError(f"Job {name}: its containers mount different volumes at "
                                f"{directory} ({', '.join(sorted(map(str, mounted)))}), where "
                                "a report is written: mount one volume there, in each of them")
        if mounted:
            volume = str(mounted.pop())
        else:
            volume = VOLUME.format(i)
            if any(v.get("name") == volume for v in volumes):
                raise ManifestError(f"Job {name}: a volume is named {volume}, the name of the "
                                    "volume of its reports: rename it")
            volumes.append({"name": volume, "emptyDir": {}})
        for container in containers:
            mounts = container.setdefault("volumeMounts", [])
            if not any(str(m.get("mountPath", "")).rstrip("/") == directory for m in mounts):
                mounts.append({"name": volume, "mountPath": directory})
        sidecar_mounts.append({"name": volume, "mountPath": directory, "readOnly": True})
    pod["initContainers"].append({
        "name": SIDECAR, "image": image, "restartPolicy": "Always",
        "command": ["sh", "-c", SCRIPT, SIDECAR], "args": list(patterns),
        "env": [{"name": MAX_BYTES_ENV, "value": str(MAX_REPORT_BYTES)}],
        "volumeMounts": sidecar_mounts,
        # Small, and bounded: a namespace whose quota wants limits still takes the pod.
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                      "limits": {"cpu": "100m", "memory": "64Mi"}},
        # What the restricted Pod Security Standard asks of a container, but its user: it runs
        # as the pod's, to read what the pod's containers wrote.
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}}})
    return body


def sidecar_edit(patterns: list[str], image: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """What the provider does to each document of a k8s_job's manifest: a Job gets the report
    sidecar (`with_report_sidecar`), anything else is created as written."""
    def edit(document: dict[str, Any]) -> dict[str, Any]:
        if document.get("kind") != "Job":
            return document
        return with_report_sidecar(document, patterns, image)
    return edit


def version_refusal(client: KubeClient) -> str | None:
    """Why this cluster cannot run the report sidecar (older than MIN_VERSION, whose API
    server drops an init container's restartPolicy: the sidecar would then block the pod),
    or None. A version that cannot be read or parsed is not refused: creating the Job says
    more."""
    try:
        version = client.server_version()
    except KubeError:
        return None
    if version is None or version[:2] >= MIN_VERSION:
        return None
    return (f"the cluster runs Kubernetes {version[2]}: a k8s_job's reports need native "
            f"sidecar containers, Kubernetes {MIN_VERSION[0]}.{MIN_VERSION[1]} or later "
            "(upgrade the cluster, or drop the pipeline's `reports`)")


# --- reading the sidecar's log -----------------------------------------------------------------

class IncompleteLog(ReportError):
    """The sidecar's log lacks its `done` line: it has not finished, or its tail is gone."""


@dataclass
class _Frame:
    """One file in the sidecar's log, as it is read: its header's path and size, and where its
    content goes (None: another report path's file, skipped; a file past max_files is
    decoded, to check the log, and dropped)."""

    path: str
    size: int = 0
    out: BinaryIO | None = None
    count: int = 0
    pending: bytes = b""

    def feed(self, line: str) -> str | None:
        """Decodes one line of base64 into `out`; what is wrong with it, or None."""
        if self.out is None:
            return None
        text = self.pending + line.strip().encode("ascii", errors="replace")
        usable = len(text) - len(text) % 4
        try:
            data = base64.b64decode(text[:usable], validate=True)
        except (binascii.Error, ValueError) as exc:
            return f"its frame of {self.path} is garbled: {line[:80]!r} is not base64 ({exc})"
        self.pending, self.count = text[usable:], self.count + len(data)
        if self.count > self.size:
            return (f"its frame of {self.path} holds more than the {self.size} bytes its "
                    "header says: garbled")
        self.out.write(data)
        return None

    def end(self, status: str) -> str | None:
        """Closes the file; what is wrong with the frame, or None."""
        if self.out is None:
            return None
        self.out.close()
        if status != "0":
            return f"it could not read {self.path} (base64 exited {status})"
        if self.pending or self.count != self.size:
            return (f"its frame of {self.path} holds {self.count} of the {self.size} bytes "
                    "its header says: the log is cut or garbled")
        return None


def _frame_path(path: str, into: Path) -> Path | None:
    """Where a file of the pod is written under `into`: its whole path, so that files of one
    name in two directories stay apart; None for what is not a file's absolute path."""
    return report_copy_path(path, into) if path.startswith("/") else None


def decode_reports(lines: Iterable[bytes], index: int, into: Path, source: str,
                   max_bytes: int = MAX_REPORT_BYTES, max_files: int = MAX_REPORT_FILES
                   ) -> list[Path]:
    """The files the sidecar's log (`lines`, without their newlines) holds for its report path
    number `index`, written under `into` (at most `max_files`, sorted); ReportError naming
    `source` (the Job, pod and container) and the file for a log that is not whole."""
    written: list[Path] = []
    stray: list[str] = []  # lines outside the frames: what a failing command said
    ready = done = False
    frame: _Frame | None = None

    def fail(why: str | None, error: type[ReportError] = ReportError) -> ReportError:
        if frame is not None and frame.out is not None:
            frame.out.close()
        said = f" (it also printed: {' | '.join(stray[-LINES_QUOTED:])})" if stray else ""
        return error(f"{source}: {why}{said}")

    with ExitStack() as files:
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            if not line.startswith(MARKER):
                if frame is None:
                    stray.append(line[:200])
                elif problem := frame.feed(line):
                    raise fail(problem)
                continue
            verb = line[len(MARKER):].strip()
            if not ready:
                if not verb.startswith("ready"):
                    raise fail("its log lacks its first line: its head is gone (the kubelet "
                               "rotates a container's log at containerLogMaxSize, 10 MiB by "
                               "default, and serves its last part only: reports that large "
                               "cannot be handed over this way)")
                ready = True
                continue
            if frame is not None:
                if not verb.startswith("end "):
                    raise fail(f"its frame of {frame.path} ends without its end line: the log "
                               "is cut or garbled")
                if problem := frame.end(verb.split()[-1]):
                    raise fail(problem)
                frame = None
                continue
            header = HEADER.fullmatch(verb)
            if verb == "done":
                done = True
            elif header is None:
                raise fail(f"its log holds a line the sidecar never prints: {line[:200]!r}")
            elif int(header[2]) != index:
                frame = _Frame(header[4]) if header[1] == "file" else None
            elif header[1] == "too-large" or int(header[3]) > max_bytes:
                raise fail(f"{header[4]} is {header[3]} bytes, more than the {max_bytes} a "
                           "report may be")
            elif (target := _frame_path(header[4], into)) is None:
                raise fail(f"a frame names {header[4]!r}, not a file's absolute path")
            elif len(written) >= max_files:
                frame = _Frame(header[4], int(header[3]), files.enter_context(
                    open(os.devnull, "wb")))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(target)
                frame = _Frame(header[4], int(header[3]),
                               files.enter_context(target.open("wb")))
    if frame is not None:
        raise fail(f"its log ends inside the frame of {frame.path}: the log is cut",
                   IncompleteLog)
    if not ready:
        raise fail("its log is empty: the sidecar never ran, or its log is gone" if not stray
                   else "its log lacks the sidecar's first line", IncompleteLog)
    if not done:
        raise fail("its log ends before its last line: the sidecar has not been stopped yet, "
                   "was killed while it printed the reports, or its log is cut", IncompleteLog)
    return sorted(written)


def _sort_key(pod: dict[str, Any]) -> tuple[str, str, str]:
    return (str(diagnose.dig(pod, "metadata.creationTimestamp", "")),
            str(diagnose.dig(pod, "status.startTime", "")), str(diagnose.dig(pod, "metadata.name")))


def fetch_reports(client: KubeClient, namespace: str, job: str, pattern: str, into: Path
                  ) -> list[Path]:
    """The files matching `pattern` (one of the Job's report paths, rendered) that the Job's
    last pod wrote, read from its report sidecar's log into `into`; [] when none matched."""
    try:
        pods = client.pods(namespace, f"job-name={job}")
    except KubeError as exc:
        raise ReportError(f"Job {job}: its pods could not be listed: {exc}") from exc
    if not pods:
        raise ReportError(f"Job {job} has no pod left to read its reports from (it was "
                          "deleted at the pipeline's timeout, or by its "
                          "ttlSecondsAfterFinished)")
    pod = max(pods, key=_sort_key)  # the last one, when the Job retried
    name = diagnose.dig(pod, "metadata.name")
    sidecar = next((c for c in diagnose.dig(pod, "spec.initContainers") or []
                    if c.get("name") == SIDECAR), None)
    if sidecar is None:
        raise ReportError(f"Job {job} pod {name} has no {SIDECAR} container to read its "
                          "reports from")
    patterns = list(sidecar.get("args") or [])
    if pattern not in patterns:
        raise ReportError(f"Job {job} pod {name}: its {SIDECAR} container reads "
                          f"{', '.join(patterns) or 'nothing'}, not {pattern}")
    source = f"Job {job} pod {name} container {SIDECAR}"
    status = next((s for s in diagnose.dig(pod, "status.initContainerStatuses") or []
                   if s.get("name") == SIDECAR), None)
    state = (status or {}).get("state") or {}
    if not state or "waiting" in state:
        waiting = state.get("waiting") or {}
        why = ": ".join(str(v) for v in (waiting.get("reason"), waiting.get("message")) if v)
        raise ReportError(f"{source} never started" + (f" ({why})" if why else ""))
    try:
        return decode_reports(_lines(client, namespace, name), patterns.index(pattern), into,
                              source)
    except IncompleteLog as exc:
        if "running" in state:
            raise ReportError(f"{exc} (it is still running: the kubelet stops it once the "
                              "pod's main containers have ended)") from exc
        raise
    except KubeError as exc:
        raise ReportError(f"{source}: {exc}") from exc


def _lines(client: KubeClient, namespace: str, pod: str) -> Iterator[bytes]:
    yield from client.pod_log_lines(namespace, pod, SIDECAR)
