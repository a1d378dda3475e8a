"""die_with_parent: a child started to be interrupted by a signal receives it even when this
process inherited that signal as ignored (a background job of a shell without job control,
where `mlci run` and its workers may well be started by a CI runner)."""

from __future__ import annotations

import signal
import subprocess
import sys

from mlci_dagster.providers.processes import die_with_parent

PROBE = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"


def test_a_child_armed_with_sigint_gets_it_even_when_the_parent_ignores_it():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        plain = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                               timeout=30)
        armed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                               timeout=30, preexec_fn=die_with_parent(signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain.stdout.strip() == "False"  # SIG_IGN survives exec: what the arming undoes
    assert armed.stdout.strip() == "True"
