"""How runs are admitted and launched, on every path: `mlci run` and the daemon's run queue."""
