"""Open budget: remote and console opens per bank in a rolling hour, persisted by the caller."""

from __future__ import annotations

from dataclasses import dataclass, replace

WINDOW_S = 3600.0


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What survives a restart. Times are wall-clock seconds since the epoch."""

    opens: tuple[float, ...] = ()  # when each open of the last hour was let through
    reported_at: float = 0.0  # the last `security.open_budget` event, 0 for never


class OpenBudget:
    """At most `per_hour` opens in any rolling hour (PROTOCOL section 7). An open refused for
    the budget is not counted; an authorised override is let through and counted like any
    other open. A wall clock set back cannot stretch the window: an open recorded later than
    now counts as made now."""

    def __init__(self, *, per_hour: int, state: BudgetState | None = None,
                 window_s: float = WINDOW_S) -> None:
        if per_hour < 0:
            raise ValueError(f"per_hour must not be negative, got {per_hour}")
        self.per_hour = per_hour
        self._window = window_s
        self.state = state or BudgetState()

    def _current(self, now: float) -> tuple[float, ...]:
        return tuple(min(at, now) for at in self.state.opens if now - min(at, now) < self._window)

    def used(self, now: float) -> int:
        """Opens counted in the hour before `now`."""
        return len(self._current(now))

    def left(self, now: float) -> int:
        return max(0, self.per_hour - self.used(now))

    def take(self, now: float, *, override: bool = False) -> bool:
        """Count one open at `now` if the budget allows it, or `override` (already authorised
        by the caller) lets it past; False, and nothing counted, when it is refused."""
        opens = self._current(now)
        if len(opens) >= self.per_hour and not override:
            self.state = replace(self.state, opens=opens)
            return False
        self.state = replace(self.state, opens=(*opens, now))
        return True

    def report_due(self, now: float) -> bool:
        """Whether a refusal at `now` is the first of its hour, and so gets its event; if it
        is, the hour starts now."""
        last = self.state.reported_at
        if last and 0.0 <= now - last < self._window:
            return False
        self.state = replace(self.state, reported_at=now)
        return True
