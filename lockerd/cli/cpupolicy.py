"""`lockerd import-bundle` yields the CPU: a daemon beside it is scheduled first."""

from __future__ import annotations

import os


def yield_cpu_to_others() -> bool:
    """Put this process on Linux's idle scheduling policy (SCHED_IDLE): a normal task that
    wakes on its core (the daemon's, for a pickup) runs at once instead of waiting for its
    slice to end, and it runs on whatever CPU nobody else wants. True if set; False where the
    policy does not exist or cannot be set (the process then runs on as it was).

    Holding the write lock while preempted is short: between two of its steps a snapshot's
    copy steps aside for a waiting writer (store/staging.py), a step is about a millisecond
    of work, and a writer waiting for the lock sleeps, which leaves the core to this process.
    A nice value was tried instead and undone: niced to 10, the import raised the median
    pickup beside it (docs/benchmarks.md, import_while_serving.py)."""
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_IDLE", None)
    if setter is None or policy is None:
        return False
    try:
        setter(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True
