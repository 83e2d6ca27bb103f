"""Pickup deadlines that wait (PROTOCOL section 14): downtime and out-of-service time, pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

HEARTBEAT_S = 60.0  # the heartbeat is written at most once per this many seconds
# A wait shorter than this extends nothing: a restart's downtime is only known to within a
# heartbeat, and a compartment out of service for seconds has cost its customer nothing.
MIN_EXTENSION_S = HEARTBEAT_S


@dataclass(slots=True)
class Heartbeat:
    """What the heartbeat keeps durably.

    `at` is the trusted wall time of the last heartbeat written while the system clock was
    synchronised; `run_s` the seconds the daemon has run since then (monotonic, summed over
    restarts while the clock was not synchronised); `out_of_service_s` the running seconds
    each compartment has spent out of service. Real time since `at` is `run_s` plus the
    downtime not measured yet, so the downtime is measured only on a synchronised clock and
    a clock set forward while it was not synchronised extends nothing.
    """

    at: float | None = None
    run_s: float = 0.0
    out_of_service_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "run_s": round(self.run_s, 3),
                "out_of_service_s": {k: round(v, 3) for k, v in self.out_of_service_s.items()}}

    @classmethod
    def from_json(cls, raw: object) -> Heartbeat:
        """A stored heartbeat; anything unreadable is no heartbeat (no downtime measured)."""
        if not isinstance(raw, dict):
            return cls()
        try:
            at = raw.get("at")
            oos = raw.get("out_of_service_s") or {}
            return cls(at=None if at is None else float(at), run_s=max(0.0, float(raw["run_s"])),
                       out_of_service_s={str(k): max(0.0, float(v)) for k, v in oos.items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            return cls()


class DeadlineClock:
    """Counts running time into the heartbeat, measures the downtime once (the first time the
    clock is synchronised after a start) and the out-of-service time of each compartment.

    Inputs carry `mono` (monotonic seconds) and `wall` (trusted wall time, epoch seconds)
    with `synced` (whether the system clock is synchronised).
    """

    def __init__(self, heartbeat: Heartbeat, *, mono: float) -> None:
        self.heartbeat = heartbeat
        self._last_mono = mono
        self._measured = False

    def _advance(self, mono: float, out_of_service: Iterable[str]) -> None:
        elapsed = max(0.0, mono - self._last_mono)
        self._last_mono = mono
        self.heartbeat.run_s += elapsed
        oos = self.heartbeat.out_of_service_s
        for cid in out_of_service:
            oos[cid] = oos.get(cid, 0.0) + elapsed

    def tick(self, *, mono: float, wall: float, synced: bool,
             out_of_service: Iterable[str]) -> float:
        """One heartbeat; returns the downtime to extend by now (seconds, 0 when none).

        Downtime is real time since the last synchronised heartbeat less the time the daemon
        ran since: never negative (a clock set back shortens nothing) and never measured on a
        clock that is not synchronised. Once synchronised, `at` follows the wall clock, so a
        jump of a running clock extends nothing.
        """
        out = set(out_of_service)
        self._advance(mono, out)
        # A compartment back in service was settled by `back_in_service`.
        self.heartbeat.out_of_service_s = {
            k: v for k, v in self.heartbeat.out_of_service_s.items() if k in out}
        if not synced:
            return 0.0
        downtime = 0.0
        if not self._measured and self.heartbeat.at is not None:
            downtime = max(0.0, wall - self.heartbeat.at - self.heartbeat.run_s)
        self._measured = True
        self.heartbeat.at = wall
        self.heartbeat.run_s = 0.0
        return downtime

    def back_in_service(self, cid: str, *, mono: float, out_of_service: Iterable[str]) -> float:
        """`cid` went back in service: the running seconds it spent out of service."""
        self._advance(mono, {*out_of_service, cid})
        return self.heartbeat.out_of_service_s.pop(cid, 0.0)

    def out_of_service(self, cid: str, *, mono: float, out_of_service: Iterable[str]) -> None:
        """`cid` went out of service: its count starts at zero, from now."""
        self._advance(mono, set(out_of_service) - {cid})
        self.heartbeat.out_of_service_s[cid] = 0.0


def extension_s(wanted_s: float, *, already_s: int, cap_s: int) -> int:
    """Whole seconds to extend a code by: `wanted_s`, within what the cap leaves (nothing
    for a wait under MIN_EXTENSION_S)."""
    if wanted_s < MIN_EXTENSION_S:
        return 0
    return max(0, min(int(wanted_s), cap_s - already_s))
