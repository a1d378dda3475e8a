"""What the loopback Kubernetes emulation keeps of what runs in its pods: each pod's volumes as
directories on this machine (what its containers write to them, and read), and the one kind of
container it runs for real: a native sidecar (an init container with `restartPolicy: Always`)
whose command is a POSIX shell script (`sh -c <script> ...`). tests/support/kube_controller.py,
playing the kubelet, decides when they start and stop.

Why run such a sidecar at all, when every other container is played from its `Behaviour`: a
sidecar's output is a function of what the pod's main containers wrote (a report sidecar prints
the files it finds), which only running its script gives faithfully. The script runs in the
machine's `sh` (dash or bash here, busybox's ash in a cluster: POSIX either way), in a process
group of its own, with the container's literal `env` values and PATH; each volume it mounts is a
directory here, and its script, arguments and output name it by its path in the pod (a path
under a mount path, in the script or an argument, points into that directory; that directory
is named by the mount path again in what it prints). It is stopped as the kubelet stops one:
SIGTERM, then SIGKILL once the pod's `terminationGracePeriodSeconds` (default 30) have passed.

Not emulated: `$(VAR)` references in arguments, `valueFrom` and `envFrom`, `subPath`, volume
kinds (every volume is an empty directory), a read-only mount (it is writable here), files of
the image (a path under no volume is this machine's), restarts of a sidecar that exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.support.kube_store import Obj

SHELLS = {"sh", "ash", "dash", "bash"}
DEFAULT_GRACE_S = 30.0  # a pod's terminationGracePeriodSeconds, by default


def is_native_sidecar(container: Obj) -> bool:
    return container.get("restartPolicy") == "Always"


def shell_argv(container: Obj) -> list[str] | None:
    """The container's command line when it is a shell running a script (`sh -c <script>
    [name [args...]]`), else None."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if len(argv) >= 3 and PurePosixPath(argv[0]).name in SHELLS and argv[1] == "-c":
        return [str(a) for a in argv]
    return None


def _mount_path(mount: Obj) -> str:
    return "/" + str(mount.get("mountPath", "")).strip("/")


@dataclass
class ShellRun:
    """One sidecar's script, running: its process, where its output goes, how much of it the
    log holds, and the mounts (path in the pod, directory here) its paths translate by."""

    process: subprocess.Popen[bytes]
    output: Path
    mounts: list[tuple[str, str]]
    read: int = 0
    stop_by: float | None = None  # when SIGKILL follows the SIGTERM sent
    exit_code: int | None = None

    def translate_out(self, text: str) -> str:
        for pod_path, here in self.mounts:
            text = text.replace(here, pod_path)
        return text


@dataclass
class PodContainers:
    """The volumes of every pod (a directory each, under one temporary root) and the sidecar
    scripts running in them, by pod uid and container name. `close()` kills what still runs
    and removes the directories."""

    runs: dict[tuple[str, str], ShellRun] = field(default_factory=dict)
    _root: Path | None = None

    @property
    def root(self) -> Path:
        """The temporary directory of it all, made when first needed."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="kube-pods-"))
        return self._root

    def volume(self, pod: Obj, name: str) -> Path:
        path = self.root / pod["metadata"]["uid"] / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _mounts(self, pod: Obj, container: Obj) -> list[tuple[str, str]]:
        """(path in the pod, directory here) of the container's mounts, longest path first."""
        volumes = {v.get("name") for v in pod["spec"].get("volumes") or []}
        mounts = [(_mount_path(m), str(self.volume(pod, m["name"])))
                  for m in container.get("volumeMounts") or [] if m.get("name") in volumes]
        return sorted(mounts, key=lambda m: -len(m[0]))

    def write(self, pod: Obj, container: Obj, files: dict[str, bytes]) -> list[str]:
        """What `container` writes (path in the pod -> content), into the volume mounted where
        each path is; a path under no volume stays in the container's own filesystem, which
        no other container sees (not kept). Returns the paths that went to a volume."""
        shared = []
        for path, content in files.items():
            for pod_path, here in self._mounts(pod, container):
                if path.startswith(f"{pod_path}/"):
                    target = Path(here) / path[len(pod_path) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                    shared.append(path)
                    break
        return shared

    def start(self, pod: Obj, container: Obj) -> bool:
        """Starts the container's script if it is a native sidecar's shell script; whether it
        did."""
        argv = shell_argv(container)
        shell = shutil.which(PurePosixPath(argv[0]).name) if argv else None
        if argv is None or shell is None or not is_native_sidecar(container):
            return False
        key = (pod["metadata"]["uid"], container["name"])
        folder = self.root / key[0]
        folder.mkdir(parents=True, exist_ok=True)
        output = folder / f"{container['name']}.out"
        mounts = self._mounts(pod, container)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder)} | {
            str(e["name"]): str(e["value"]) for e in container.get("env") or []
            if "value" in e}
        with output.open("wb") as out:
            process = subprocess.Popen(
                [shell, "-c", *(_translate_in(a, mounts) for a in argv[2:])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=folder,
                env=env, start_new_session=True)
        self.runs[key] = ShellRun(process, output, mounts)
        return True

    def running(self, pod: Obj, name: str) -> ShellRun | None:
        return self.runs.get((pod["metadata"]["uid"], name))

    def stop(self, pod: Obj, name: str) -> None:
        """SIGTERM, as the kubelet stops a container; SIGKILL follows at the grace period."""
        run = self.running(pod, name)
        if run is None or run.stop_by is not None:
            return
        grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        run.stop_by = time.monotonic() + float(grace)
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGTERM)

    def pump(self, pod: Obj, name: str) -> str:
        """What the script printed since the last pump, whole lines only (the rest once it
        ended), its paths as the pod names them; records its exit code once it ended (killing
        it once its grace period is over)."""
        run = self.running(pod, name)
        if run is None:
            return ""
        if run.exit_code is None:
            code = run.process.poll()
            if code is None and run.stop_by is not None and time.monotonic() >= run.stop_by:
                _kill_group(run.process)
                code = 128 + signal.SIGKILL
            if code is not None:
                _kill_group(run.process)  # what it left behind (a `sleep` in the background)
                run.exit_code = 128 - code if code < 0 else code
        data = run.output.read_bytes()[run.read:]
        if run.exit_code is None:
            data = data[:data.rfind(b"\n") + 1]
        run.read += len(data)
        return run.translate_out(data.decode("utf-8", errors="replace"))

    def exit_code(self, pod: Obj, name: str) -> int | None:
        run = self.running(pod, name)
        return None if run is None else run.exit_code

    def forget(self, uid: str) -> None:
        """A pod that is gone: kills what still runs in it, removes its directories."""
        for key in [k for k in self.runs if k[0] == uid]:
            _kill_group(self.runs.pop(key).process)
        shutil.rmtree(self.root / uid, ignore_errors=True)

    def uids(self) -> set[str]:
        """The pods it keeps anything of."""
        kept = {p.name for p in self._root.iterdir()} if self._root is not None else set()
        return kept | {k[0] for k in self.runs}

    def close(self) -> None:
        for uid in self.uids():
            self.forget(uid)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _translate_in(text: str, mounts: list[tuple[str, str]]) -> str:
    """The script or an argument, each path in it under a mount (a whole path: `/data` in
    `cat /data/x`, not in `/database`) as a path to that mount's directory here."""
    for pod_path, here in mounts:  # the longest first: a mount inside another wins
        text = re.sub(rf"(?<![\w./-]){re.escape(pod_path)}(?![\w.-])",
                      lambda _, here=here: here, text)
    return text


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
