"""The harness's clock for leases, holds and the guard: the system's, shifted by
`$MLCI_CLOCK_OFFSET_S` seconds when set, so a simulation (or a test) can live through a chosen
day in every process it starts. Dagster's scheduler keeps its own clock."""

from __future__ import annotations

import os
import time

OFFSET_ENV = "MLCI_CLOCK_OFFSET_S"


def now() -> float:
    """Seconds since the epoch, as the harness sees them."""
    return time.time() + float(os.environ.get(OFFSET_ENV) or 0.0)


def offset_to(moment: float) -> str:
    """The value of $MLCI_CLOCK_OFFSET_S that makes now() read `moment` at this instant."""
    return repr(moment - time.time())
