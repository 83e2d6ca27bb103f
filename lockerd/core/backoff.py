"""Capped exponential backoff with jitter, for reconnecting forever without a thundering herd."""

from __future__ import annotations

import random


class Backoff:
    """Delay n is uniform in [cap_n / 2, cap_n], cap_n = min(max_s, min_s * 2**n).

    Half the delay is kept so a bank never hammers the broker; the other half is random so a
    fleet that lost the same broker does not come back in lockstep.
    """

    def __init__(self, *, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if min_s <= 0 or max_s < min_s:
            raise ValueError("need 0 < min_s <= max_s")
        self._min = min_s
        self._max = max_s
        self._rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        cap = min(self._max, self._min * 2.0 ** min(self.attempt, 62))
        self.attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0
