"""The one rate-limited rejection recorder: refusals are evented, a flood of them is not."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lockerd.core.lockout import RateLimiter


class RejectionRecorder:
    """At most `per_minute` rejection events a minute on the injected `monotonic` clock; the
    next one recorded says in `suppressed` how many were held back. `write` records one event
    (type, data); a refusal that is held back is still logged by its caller."""

    def __init__(
        self,
        *,
        per_minute: int,
        monotonic: Callable[[], float],
        write: Callable[[str, dict[str, object]], object],
    ) -> None:
        self._limiter = RateLimiter(per_minute=per_minute)
        self._monotonic = monotonic
        self._write = write

    def record(self, type_: str, data: Mapping[str, object]) -> bool:
        """Event this rejection unless the limit holds it back; True when it was evented."""
        admitted = self._limiter.admit(data, self._monotonic())
        if admitted is None:
            return False
        self._write(type_, admitted)
        return True
