"""Runs a service with its output redacted into a log file: `python -m ... LOG -- ARGV...`.

The service's own output never touches disk unredacted. This module imports nothing heavy, since
it starts once per service.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from mlci_dagster.redact import Redactor

REDACT_VARS_ENV = "MLCI_REDACT_VARS"


def main(argv: list[str]) -> int:
    log_path, separator, *command = argv
    if separator != "--" or not command:
        print("usage: logpipe LOG -- COMMAND...", file=sys.stderr)
        return 2
    names = [n for n in os.environ.get(REDACT_VARS_ENV, "").split(",") if n]
    redactor = Redactor.from_env(names)
    # The whole process group gets SIGTERM; keep draining until the service's output ends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
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
        for raw in child.stdout:
            log.write(redactor.text(raw.decode("utf-8", errors="replace")))
            log.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
