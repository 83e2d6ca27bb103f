"""Console login throttle: failures counted per connection and per token issuer, so junk from
one connection or one issuer cannot lock every other technician out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lockerd.core.lockout import Lockout, LockoutState

# Issuers are keyids of the technicians role and tech_ids of verified tokens, so the set is
# small; the cap only bounds what a hand-edited database could make the daemon hold.
MAX_ISSUERS = 256


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    free_attempts: int
    base_s: float
    max_s: float

    def lockout(self, state: LockoutState | None = None) -> Lockout:
        return Lockout(free_attempts=self.free_attempts, base_s=self.base_s, max_s=self.max_s,
                       state=state)


@dataclass
class ConnectionThrottle:
    """One connection's failures. `junk` counts lines that are not even a token and throttles
    only such lines; `refused` counts well-formed tokens that failed and throttles every
    login on the connection. Kept in memory: it ends with the connection."""

    junk: Lockout
    refused: Lockout

    @classmethod
    def new(cls, settings: ThrottleSettings) -> ConnectionThrottle:
        return cls(junk=settings.lockout(), refused=settings.lockout())

    def clear(self) -> None:
        self.junk.clear()
        self.refused.clear()


@dataclass
class IssuerLockouts:
    """Failures of well-formed tokens per issuer ("tech:<tech_id>" or "key:<keyids>"),
    persisted by the caller through `to_meta` / `from_meta`."""

    settings: ThrottleSettings
    lockouts: dict[str, Lockout] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, settings: ThrottleSettings, raw: Any) -> IssuerLockouts:
        """Read what `to_meta` wrote; anything else (an older global lockout, a hand edit)
        starts empty rather than stopping the console."""
        out = cls(settings)
        issuers = raw.get("issuers") if isinstance(raw, dict) else None
        if not isinstance(issuers, dict):
            return out
        for issuer, state in list(issuers.items())[:MAX_ISSUERS]:
            if isinstance(issuer, str) and isinstance(state, dict):
                try:
                    out.lockouts[issuer] = settings.lockout(LockoutState(**state))
                except TypeError:
                    continue
        return out

    def to_meta(self) -> dict[str, Any]:
        return {"issuers": {issuer: asdict(lock.state) for issuer, lock in self.lockouts.items()
                            if lock.state != LockoutState()}}

    def remaining(self, issuer: str, now: float) -> float:
        lock = self.lockouts.get(issuer)
        return 0.0 if lock is None else lock.remaining(now)

    def record_failure(self, issuer: str, now: float) -> float | None:
        lock = self.lockouts.get(issuer)
        if lock is None:
            if len(self.lockouts) >= MAX_ISSUERS:
                self._forget_quietest(now)
            lock = self.lockouts[issuer] = self.settings.lockout()
        return lock.record_failure(now)

    def record_success(self, issuer: str) -> bool:
        """Reset the issuer; True when there was something to reset (and so to save)."""
        return self.lockouts.pop(issuer, None) is not None

    def clear(self) -> None:
        self.lockouts.clear()

    def _forget_quietest(self, now: float) -> None:
        # An issuer still locked out is kept; among the rest the longest quiet goes first.
        free = [(lock.state.last_failure_at, issuer) for issuer, lock in self.lockouts.items()
                if lock.remaining(now) <= 0]
        victim = min(free)[1] if free else min(
            (lock.state.locked_until, issuer) for issuer, lock in self.lockouts.items())[1]
        del self.lockouts[victim]

