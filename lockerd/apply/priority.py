"""Bulk code work (an apply process, `lockerd import-bundle`) runs below the daemon."""

from __future__ import annotations

import contextlib
import os

# A bulk apply is background work: on a board whose cores are all busy, the daemon (a
# keypress, its pulse, the event loop) gets the core first. CFS gives a process at nice 10
# about a tenth of a contended core beside one at 0, and all of an idle one.
APPLY_NICE = 10


def lower_priority() -> None:
    """Run this process at APPLY_NICE above its own niceness; where that is refused, as it
    is."""
    with contextlib.suppress(OSError):
        os.nice(APPLY_NICE)
