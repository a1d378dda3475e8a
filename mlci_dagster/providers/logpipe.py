"""Redacted output logs in bounded memory: the writer that streams a process's output into its
log, and the entry point that runs a service through it: `python -m ... LOG -- ARGV...`.

Output never touches disk unredacted, and only a small tail of it is ever held in memory. This
module imports nothing heavy, since it starts once per service.
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import TextIO

from mlci_dagster.common.redact import Redactor

REDACT_VARS_ENV = "MLCI_REDACT_VARS"
CHUNK_BYTES = 64 * 1024
MAX_LINE_CHARS = 64 * 1024
TAIL_CHARS = 16 * 1024
STDOUT, STDERR = "stdout", "stderr"
_WHITESPACE = " \t\r\f\v"


LOG_TAIL_CHARS = 2000


def log_tail(path: str | os.PathLike[str], chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` bytes of a log, decoded; "" when it cannot be read."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - chars))
            return log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class SharedLog:
    """A log file that several streams write to; a `--- <stream>` line marks each change of
    stream (an unnamed stream gets no marker)."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._stream: str | None = None
        self._mid_line = False

    def write(self, stream: str, text: str) -> None:
        if stream != self._stream:
            if self._mid_line:
                self._file.write("\n")
            if stream:
                self._file.write(f"--- {stream}\n")
            self._stream = stream
        self._file.write(text)
        # Flushed at once: the log is read while the process runs, and kept if the run crashes.
        self._file.flush()
        self._mid_line = not text.endswith("\n")


class OutputWatcher:
    """Checks output as it streams by, so nothing needs the whole of it.

    `missing` holds the expected substrings not yet seen in any one stream (a substring may
    span a line break); `captured` holds, per capture, group 1 (else the whole match) of the
    first stdout line its regex matches. A line cut for length counts as lines of its pieces.
    """

    def __init__(self, expected: Iterable[str] = (), captures: Mapping[str, str] | None = None
                 ) -> None:
        self.missing = [s for s in dict.fromkeys(expected) if s]
        self.captured: dict[str, str] = {}
        self._patterns = {key: re.compile(p) for key, p in (captures or {}).items()}
        self._keep = max(map(len, self.missing), default=1) - 1
        self._carry: dict[str, str] = {}

    def feed(self, stream: str, text: str) -> None:
        if self.missing:
            window = self._carry.get(stream, "") + text
            self.missing = [s for s in self.missing if s not in window]
            self._carry[stream] = window[-self._keep:] if self._keep else ""
        if stream == STDOUT and len(self.captured) < len(self._patterns):
            for line in text.split("\n"):
                for key, pattern in self._patterns.items():
                    if key not in self.captured and (match := pattern.search(line)):
                        self.captured[key] = match.group(1) if match.groups() else match.group(0)


class RedactingWriter:
    """One output stream into a SharedLog: decoded, redacted line by line, lines longer than
    `max_line_chars` cut; only the last `tail_chars` characters stay in memory (`tail`).

    A long line is cut after its last whitespace, so a secret or credential token (`\\S+`)
    stays whole and is masked. Two edge cases are not: a run of more than `max_line_chars`
    without whitespace is cut hard, and a secret spanning that cut escapes the mask; and a
    `password: value` whose key and value fall on either side of a cut loses its value's mask.
    """

    def __init__(
        self, log: SharedLog, stream: str, redactor: Redactor,
        watcher: OutputWatcher | None = None, *, max_line_chars: int = MAX_LINE_CHARS,
        tail_chars: int = TAIL_CHARS,
    ) -> None:
        self.log, self.stream, self.redactor, self.watcher = log, stream, redactor, watcher
        self.max_line_chars, self.tail_chars = max_line_chars, tail_chars
        self.tail = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # the current line's start: no newline, at most max_line_chars

    def write(self, chunk: bytes) -> None:
        text = self._decoder.decode(chunk)
        # Slices of at most max_line_chars: only the first line of each can be too long.
        for start in range(0, len(text), self.max_line_chars):
            self._take(text[start:start + self.max_line_chars])

    def close(self) -> None:
        self._take(self._decoder.decode(b"", final=True))
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _take(self, piece: str) -> None:
        text, limit = self._pending + piece, self.max_line_chars
        while len(text) > limit and text.find("\n", 0, limit + 1) < 0:
            cut = max(text.rfind(c, 0, limit) for c in _WHITESPACE) + 1 or limit
            self._emit(text[:cut])
            text = text[cut:]
        end = text.rfind("\n") + 1
        if end:
            self._emit(text[:end])
        self._pending = text[end:]

    def _emit(self, text: str) -> None:
        redacted = self._redact(text)
        self.log.write(self.stream, redacted)
        self.tail = (self.tail + redacted)[-self.tail_chars:]
        if self.watcher is not None:
            self.watcher.feed(self.stream, redacted)

    def _redact(self, text: str) -> str:
        # Line by line, as a credential shape must not match across a line break; the whole
        # block is tried first, since almost all output has nothing to mask.
        if self.redactor.text(text) == text:
            return text
        return "\n".join(self.redactor.text(line) for line in text.split("\n"))


def main(argv: list[str]) -> int:
    log_path, separator, *command = argv
    if separator != "--" or not command:
        print("usage: logpipe LOG -- COMMAND...", file=sys.stderr)
        return 2
    names = [n for n in os.environ.get(REDACT_VARS_ENV, "").split(",") if n]
    redactor = Redactor.from_env(names)
    # The whole process group gets SIGTERM; keep draining until the service's output ends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(log_path, "a", encoding="utf-8") as log:
        try:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
            )
        except OSError as exc:
            log.write(f"cannot start {command[0]!r}: {exc.strerror}\n")
            return 127
        assert child.stdout is not None
        writer = RedactingWriter(SharedLog(log), "", redactor)
        while chunk := os.read(child.stdout.fileno(), CHUNK_BYTES):
            writer.write(chunk)
        writer.close()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
