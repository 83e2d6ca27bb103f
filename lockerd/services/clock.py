"""Clocks: monotonic time for timeouts, trusted wall time for expiry (with a persisted floor)."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from lockerd.core.timefloor import raised_floor, trusted_now
from lockerd.logs import get_logger
from lockerd.store.db import Database

log = get_logger("lockerd.clock")

_TIME_ERROR = 5  # adjtimex(2): "clock not synchronized"


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(UTC)


class KernelSyncStatus:
    """Whether NTP has synchronised the clock, as the kernel says (adjtimex, read-only).

    Asked on every expiry check, so libc is loaded once and the answer kept for a few
    seconds: synchronisation changes on the scale of minutes.
    """

    def __init__(
        self,
        *,
        cache_s: float = 5.0,
        timesync_flag: Path = Path("/run/systemd/timesync/synchronized"),
        adjtimex: Callable[[ctypes.Array[ctypes.c_char]], int] | None = None,
    ) -> None:
        self._cache_s = cache_s
        self._timesync_flag = timesync_flag
        self._checked_at = -float("inf")
        self._value = False
        self._adjtimex = adjtimex
        if self._adjtimex is None:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
                self._adjtimex = libc.adjtimex
            except (OSError, AttributeError):
                log.warning("adjtimex is not available; asking systemd-timesyncd instead")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < self._cache_s:
            return self._value
        self._checked_at = now
        state = -1
        if self._adjtimex is not None:
            buf = ctypes.create_string_buffer(1024)  # struct timex, modes = 0: read only
            state = int(self._adjtimex(buf))
        if state == -1:
            # Refused (systemd's ProtectClock filters adjtimex): systemd-timesyncd leaves
            # this file once it has synchronised the clock.
            self._value = self._timesync_flag.exists()
        else:
            self._value = state != _TIME_ERROR
        return self._value


class TrustedClock:
    """Wall time for expiry checks and event times; the floor lives in the database."""

    def __init__(
        self,
        *,
        db: Database,
        mode: str = "auto",
        system: Callable[[], datetime] | None = None,
        synchronised: Callable[[], bool] | None = None,
    ) -> None:
        self._db = db
        self._mode = mode
        self._system = system or (lambda: datetime.now(UTC))
        self._synchronised = synchronised or (
            (lambda: False) if mode != "auto" else KernelSyncStatus())
        stored = db.get_meta("time_floor")
        self.floor: datetime | None = (
            None if stored is None else datetime.fromtimestamp(float(stored), UTC)
        )

    def monotonic(self) -> float:
        return time.monotonic()

    def synchronised(self) -> bool:
        if self._mode == "always":
            return True
        if self._mode == "never":
            return False
        return self._synchronised()

    def wall(self) -> datetime:
        return trusted_now(self._system(), synchronised=self.synchronised(), floor=self.floor)

    def observe_signed_time(self, issued_at: datetime) -> None:
        """A verified document was issued at `issued_at`: raise the floor, durably."""
        new = raised_floor(self.floor, issued_at)
        if new != self.floor:
            self._db.set_meta("time_floor", new.timestamp())
            self.floor = new
            log.debug("time floor raised", floor=new.isoformat())
