"""The write lock's doorbell: the daemon's writer rings it, a long copy steps aside only then."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

# Beside the database, like its -wal and -shm files (an empty file: only its lock is used).
TURN_SUFFIX = "-turn"
# How often a copy that stepped aside looks whether the writer is done, and for how long at
# most it waits for one: a writer holds the bell for one transaction (a commit of a few rows
# and its fsync, a few ms), and longer only if it is stuck, which must not stop the copy.
STEP_ASIDE_POLL_S = 0.0002
STEP_ASIDE_MAX_S = 0.05


class WriteTurn:
    """An flock on `<database>-turn`, shared between the processes of one bank.

    The daemon's writer (`Database.wait_for_lock_promptly`) holds it shared from before its
    BEGIN until its COMMIT: "a writer that must not wait is waiting or writing". A snapshot's
    copy into the live database (lockerd/store/staging.py) runs in short transactions and,
    between two of them, asks `rung()`: only while a writer holds the bell does it pause, until
    the writer is done. Without the bell it paused a fixed millisecond after every step
    whether anyone waited or not: half of a big copy's time.

    flock(2) locks belong to an open file, not a process: two WriteTurns in one process (the
    daemon's writer and a worker thread's staging) see each other's locks too. A lock dies with
    its process, so a writer that crashed rings no more. Where the file cannot be opened (a
    read-only state directory), `ring` and `rung` say so and the caller falls back."""

    def __init__(self, database: Path) -> None:
        self.path = Path(f"{database}{TURN_SUFFIX}")
        self._fd: int | None = None
        self._unusable = False

    def _open(self) -> int | None:
        if self._fd is None and not self._unusable:
            try:
                # Read-only is enough for flock; 0o644 so that a process of another user (an
                # import run as root) can still open the file the daemon made, and back.
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._unusable = True
        return self._fd

    def ring(self) -> bool:
        """Take the bell shared without waiting. False when it is not to be had: no file,
        or a copy looking at this very instant (the caller's own retry still takes the
        database's lock, as without the bell)."""
        fd = self._open()
        if fd is None:
            return False
        for _ in range(2):  # a copy's look holds it for an instant: once more at once
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            except OSError:
                return False
            return True
        return False

    def release(self) -> None:
        """Let the bell go (harmless when not held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def rung(self) -> bool | None:
        """Whether a writer holds the bell now; None if that cannot be known (no file)."""
        fd = self._open()
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def step_aside(self, max_s: float = STEP_ASIDE_MAX_S) -> bool | None:
        """For a copy between two of its transactions: while a writer holds the bell, wait
        for it to let go (at most `max_s`). True if it waited, False if nobody rang, None if
        that cannot be known (the caller pauses the old way)."""
        waiting = self.rung()
        if not waiting:
            return waiting
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            time.sleep(STEP_ASIDE_POLL_S)
            if not self.rung():
                break
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
