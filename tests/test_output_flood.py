"""Output floods: a pipeline's output streams, redacted, to its log, and only a bounded tail of it
is held in memory or stored."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from pathlib import Path

from mlci_dagster.common.redact import Redactor
from mlci_dagster.providers.logpipe import (
    STDERR,
    STDOUT,
    OutputWatcher,
    RedactingWriter,
    SharedLog,
)
from mlci_dagster.providers.processes import run_group
from tests.support.registries import PY, command_pipeline, config, write_registry
from tests.support.runs import run_partition, stage_details

SECRET = "tok-5e4d3c2b1a09"

# 50 MB of stdout, then one 600 KB line holding the secret in its middle and at its end, with
# whitespace only around the secrets, then a last line; it fails, so its summary is kept.
FLOOD = """\
import os, sys
out, token = sys.stdout.buffer, os.environ['API_TOKEN'].encode()
for _ in range(500):
    out.write((b'x' * 99 + b'\\n') * 1000)
out.write(b'z' * 300_000 + b' ' + token + b' ' + b'z' * 300_000 + b' ' + token + b'\\n')
out.write(b'flood done\\n')
sys.exit(3)
"""


class RecordedLog(SharedLog):
    """A SharedLog that keeps each piece written, to see where lines were cut."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.pieces: list[str] = []

    def write(self, stream: str, text: str) -> None:
        self.pieces.append(text)


def test_flooding_pipeline_streams_to_its_log_and_stores_only_a_tail(
    instance, dagster_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLCI_TEST_TOKEN", SECRET)
    flood = command_pipeline("flood", FLOOD, timeout_s=60,
                             env={"API_TOKEN": "${env.MLCI_TEST_TOKEN}"})
    registry = write_registry(tmp_path / "reg", [config("flood", pipelines=[flood])],
                              secrets=["MLCI_TEST_TOKEN"])

    # Memory is measured by benchmarks/output_flood.py; this test checks where output goes.
    result, record = run_partition(instance, registry, "flood|e1")

    assert record["status"] == "fail-pipeline_runs"
    assert "exited 3" in record["error_summary"]
    assert record["error_summary"].endswith("flood done\n")
    details = stage_details(instance, result.run_id, "pipeline_runs")
    assert len(json.dumps(details)) < 10_000 and "pipelines" in details  # small, not truncated
    log = Path(details["pipelines"][0]["log_ref"])
    assert log.stat().st_size > 50_000_000
    with open(log, "rb") as file:
        file.seek(-700_000, os.SEEK_END)
        end = file.read().decode()
    assert end.endswith("\nflood done\n")
    assert SECRET not in end
    assert f"{'z' * 1000} *** {'z' * 1000}" in end
    assert f"{'z' * 1000} ***\n" in end


def test_watcher_finds_expected_output_across_a_line_break_and_chunks():
    watcher = OutputWatcher(["epoch 3\nloss", "never"])

    for chunk in ["training\nep", "och 3\n", "lo", "ss=0.1\n"]:
        watcher.feed(STDERR, chunk)

    assert watcher.missing == ["never"]


def test_watcher_captures_the_first_match_of_each_regex_in_a_stdout_line():
    watcher = OutputWatcher(captures={"run_id": r"^run_id=(\d+)$", "loss": r"loss=\S+"})

    watcher.feed(STDERR, "run_id=1\n")
    watcher.feed(STDOUT, "prefix run_id=2\nrun_id=3\nloss=0.5 run_id=4\n")
    watcher.feed(STDOUT, "run_id=5\n")

    assert watcher.captured == {"run_id": "3", "loss": "loss=0.5"}


def test_writer_keeps_only_a_bounded_tail(tmp_path):
    path = tmp_path / "out.log"
    with open(path, "w", encoding="utf-8") as file:
        writer = RedactingWriter(SharedLog(file), STDOUT, Redactor(), tail_chars=1000)
        for i in range(20_000):
            writer.write(f"line {i}\n".encode())
        writer.close()

    assert len(writer.tail) == 1000
    assert path.read_text().endswith(writer.tail)
    assert writer.tail.endswith("line 19999\n")


def test_writer_cuts_a_long_line_at_whitespace_so_a_secret_stays_whole_and_masked():
    log = RecordedLog()
    writer = RedactingWriter(log, STDOUT, Redactor([SECRET]), max_line_chars=64)
    line = "a" * 50 + " " + SECRET + " " + "b" * 200 + "\n"

    # Split mid-secret and mid-character: neither may leak or garble.
    data = (line + "é\n").encode()
    for start in range(0, len(data), 7):
        writer.write(data[start:start + 7])
    writer.close()

    assert all(len(piece) <= 64 for piece in log.pieces)
    assert "".join(log.pieces) == line.replace(SECRET, "***") + "é\n"
    assert log.pieces[0] == "a" * 50 + " "  # cut after the last whitespace before the limit
    assert log.pieces[1].startswith("*** ")


def test_writer_cuts_a_line_without_whitespace_at_the_limit():
    log = RecordedLog()
    writer = RedactingWriter(log, STDOUT, Redactor(), max_line_chars=64)

    writer.write(b"c" * 150 + b"\n")
    writer.close()

    assert [len(p) for p in log.pieces] == [64, 64, 23]


def test_run_group_is_not_stalled_by_a_process_that_left_the_group_holding_its_pipe(tmp_path):
    escape = ("import subprocess; "
              "p = subprocess.Popen(['sleep', '60'], start_new_session=True); print(p.pid)")
    started = time.monotonic()

    done = run_group([PY, "-c", escape], cwd=tmp_path, env=dict(os.environ), timeout_s=30,
                     log_path=tmp_path / "escape.log")

    with contextlib.suppress(ProcessLookupError, ValueError):
        os.kill(int(done.stdout_tail), signal.SIGKILL)
    assert done.exit_code == 0 and not done.timed_out
    assert time.monotonic() - started < 10
    assert (tmp_path / "escape.log").read_text() == f"--- stdout\n{done.stdout_tail}"
