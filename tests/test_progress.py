"""`mlci run`'s progress, as a user sees it: appended lines into a pipe (a CI log), a table
redrawn in place on a terminal (a real pseudo-terminal here), and an image build's own last
line while it is the partition's stage."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import time

from mlci_dagster.launch.progress import Progress, last_line
from mlci_dagster.paths import LOCAL_EXAMPLE
from mlci_dagster.registry import load_registry
from mlci_dagster.stages.image import content_hash
from tests.support.registries import PY

STAGE_LINE = re.compile(r"^  static-site\|sqlite: (starting|image|sandbox|pipeline_runs|"
                        r"ui_smoke|teardown|results) \d+s", re.MULTILINE)


def mlci_run(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "mlci_dagster.cli", "--registry", str(LOCAL_EXAMPLE),
                             "run", "--config", "static-site", "--engine", "sqlite", *args],
                            env=os.environ,
                            **popen)


def test_into_a_pipe_each_partition_says_its_stages_as_lines(dagster_home):
    proc = mlci_run(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)

    assert proc.returncode == 0, out
    assert out.startswith("running 1 partition, 1 at a time")
    assert len(STAGE_LINE.findall(out)) >= 2, out  # at least its start and one stage
    assert "\x1b[" not in out  # no terminal control codes in a log
    said = out.index("static-site|sqlite: starting")
    assert said < out.index("static-site|sqlite: passed in")


def test_on_a_terminal_a_table_is_redrawn_in_place(dagster_home):
    parent, child = pty.openpty()
    proc = mlci_run(stdout=child, stderr=child, stdin=subprocess.DEVNULL)
    os.close(child)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            data = os.read(parent, 65536)
        except OSError:  # the child side is closed: it ended
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(parent)
    screen = b"".join(chunks).decode(errors="replace")

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)  # what the terminal shows

    assert proc.returncode == 0, screen
    assert re.search(r"partition\s+stage\s+elapsed", text)
    assert "\x1b[2K\x1b[1A" in screen  # lines erased and redrawn in place
    assert re.search(r"static-site\|sqlite\s+(sandbox|pipeline_runs|ui_smoke|teardown|"
                     r"image|results|starting)\s+\d+s", text)  # a stage, and its time
    assert re.search(r"static-site\|sqlite\s+passed", text)


def image_stage_lines(instance, monkeypatch, home, build_log: str, written_ago_s: float
                      ) -> str:
    """What a pipe shows of static-site|sqlite once it is in its image stage, its image's build
    log holding `build_log`, last written `written_ago_s` seconds ago (0: as it started)."""
    import mlci_dagster.launch.progress as progress_module

    registry = load_registry(LOCAL_EXAMPLE)
    config = registry.configs["static-site"].config
    log = home / "images" / f"{content_hash(registry.root, config.image.build)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(build_log)
    out = io.StringIO()
    progress = Progress(instance, registry, ["static-site|sqlite"], home, stream=out,
                        live=False)
    progress.started("static-site|sqlite", "run-1")
    written = time.time() - written_ago_s
    os.utime(log, (written, written))
    monkeypatch.setattr(progress_module, "current_stage", lambda instance, run_id: "image")

    progress.tick()

    return out.getvalue()


def test_an_image_build_shows_its_own_last_line(tmp_path, instance, monkeypatch):
    shown = image_stage_lines(instance, monkeypatch, tmp_path / "mlci",
                              "--- stdout\nresolving 152 packages\nDownloading torch (1.2 GiB) "
                              "48%\n\n", written_ago_s=0)

    assert shown.splitlines()[-1] == \
        "  static-site|sqlite: image 0s: Downloading torch (1.2 GiB) 48%"
    assert last_line(tmp_path / "missing.log") == ""


def test_a_cached_image_shows_no_line_of_the_build_that_made_it(tmp_path, instance,
                                                                monkeypatch):
    """Its log is the old build's: nothing is being built, so nothing of it is shown."""
    shown = image_stage_lines(instance, monkeypatch, tmp_path / "mlci",
                              "--- stdout\nSuccessfully installed torch-2.4.0\n",
                              written_ago_s=3600)

    assert shown.splitlines()[-1] == "  static-site|sqlite: image 0s"
    assert "Successfully installed" not in shown


def test_a_waiting_partition_says_why(tmp_path, instance):
    registry = load_registry(LOCAL_EXAMPLE)
    out = io.StringIO()
    progress = Progress(instance, registry, ["static-site|sqlite"], tmp_path / "mlci",
                        stream=out, live=False)

    progress.waiting("static-site|sqlite", "pool gpu is full")

    assert out.getvalue() == "  static-site|sqlite: waiting: pool gpu is full\n"
