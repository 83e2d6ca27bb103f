"""Brute-force lockout (growth, reset, persisted state, clock set back) and the rate limiter."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockerd.core.lockout import CONSUMED_USE_EVENTS, Lockout, LockoutState, RateLimiter

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0  # a wall-clock time, seconds since the epoch


def make(
    *,
    free: int = 3,
    base: float = 30.0,
    max_s: float = 600.0,
    forget: float = 86400.0,
    state: LockoutState | None = None,
) -> Lockout:
    return Lockout(free_attempts=free, base_s=base, max_s=max_s, forget_after_s=forget,
                   state=state)


def fail(lock: Lockout, times: list[float]) -> list[float | None]:
    return [lock.record_failure(t) for t in times]


@pytest.mark.parametrize(
    ("free", "expected"),
    [
        # The free_attempts-th wrong code starts the first lockout (config: "wrong codes before
        # the keypad locks"), then each further one doubles it.
        (1, [30.0, 60.0, 120.0, 240.0]),
        (3, [None, None, 30.0, 60.0, 120.0, 240.0]),
        (5, [None, None, None, None, 30.0, 60.0]),
    ],
)
def test_free_attempts_then_lockout(free: int, expected: list[float | None]) -> None:
    lock = make(free=free)
    times = [T0 + 1000.0 * i for i in range(len(expected))]
    assert fail(lock, times) == expected


def test_no_lockout_during_the_free_attempts() -> None:
    lock = make(free=3)
    fail(lock, [T0, T0 + 1])
    assert lock.remaining(T0 + 1) == 0.0
    assert lock.state.failures == 2
    assert lock.state.lockouts == 0


def test_lockout_doubles_up_to_max() -> None:
    lock = make(free=1, base=30.0, max_s=200.0)
    got = fail(lock, [T0 + 1000.0 * i for i in range(7)])
    assert got == [30.0, 60.0, 120.0, 200.0, 200.0, 200.0, 200.0]
    assert lock.state.lockouts == 7


def test_many_lockouts_stay_capped_without_overflow() -> None:
    lock = make(free=1, base=1.0, max_s=3600.0)
    got = fail(lock, [T0 + 10_000.0 * i for i in range(200)])
    assert max(s for s in got if s is not None) == 3600.0
    assert got[-1] == 3600.0


def test_remaining_counts_down() -> None:
    lock = make(free=1, base=30.0)
    assert lock.record_failure(T0) == 30.0
    assert lock.remaining(T0) == 30.0
    assert lock.remaining(T0 + 10.0) == 20.0
    assert lock.remaining(T0 + 29.5) == pytest.approx(0.5)
    assert lock.remaining(T0 + 30.0) == 0.0
    assert lock.remaining(T0 + 3000.0) == 0.0


@pytest.mark.parametrize("reset", ["success", "clear"])
def test_success_and_clear_reset_everything(reset: str) -> None:
    lock = make(free=2)
    fail(lock, [T0, T0 + 1, T0 + 100])
    assert lock.remaining(T0 + 100) > 0
    if reset == "success":
        lock.record_success()
    else:
        lock.clear()
    assert lock.state == LockoutState()
    assert lock.remaining(T0 + 100) == 0.0
    # The free attempts are back and the next lockout starts again at base_s.
    assert fail(lock, [T0 + 200, T0 + 201]) == [None, 30.0]


@pytest.mark.parametrize(
    ("event", "resets"),
    [
        # Consumed for good: the parcel left with its customer, or went in for good.
        ("pickup.completed", True),
        ("deposit.confirmed", True),
        # A credential granted or a door opened is not a use consumed: the same credential
        # can be presented again (a courier or deposit code, a deposit token, a pickup closed
        # on its parcel), so none of these may forgive wrong codes.
        ("session.started", False),
        ("lock.pulse", False),
        ("door.opened", False),
        ("pickup.opened", False),
        ("pickup.incomplete", False),
        ("deposit.opened", False),
        ("deposit.aborted", False),
        ("session.ended", False),
        ("door.jammed", False),
        ("parcel.removed", False),
        ("command.result", False),
    ],
)
def test_only_a_use_consumed_for_good_resets_the_lockout(event: str, resets: bool) -> None:
    assert (event in CONSUMED_USE_EVENTS) is resets


def test_a_long_quiet_spell_forgets_the_history() -> None:
    lock = make(free=2, forget=3600.0)
    assert fail(lock, [T0, T0 + 1, T0 + 100]) == [None, 30.0, 60.0]
    # More than forget_after_s after the last failure: counted as a first wrong code.
    assert lock.record_failure(T0 + 100 + 3600.5) is None
    assert lock.state.failures == 1
    assert lock.state.lockouts == 0


def test_a_quiet_spell_shorter_than_forget_keeps_the_history() -> None:
    lock = make(free=2, forget=3600.0)
    fail(lock, [T0, T0 + 1])
    assert lock.record_failure(T0 + 1 + 3599.0) == 60.0


@pytest.mark.parametrize("set_back_s", [1.0, 600.0, 86400.0, 10 * 365 * 86400.0])
def test_clock_set_back_cannot_stretch_the_lockout_beyond_max(set_back_s: float) -> None:
    lock = make(free=1, base=30.0, max_s=600.0)
    fail(lock, [T0, T0 + 40, T0 + 200, T0 + 500, T0 + 1500, T0 + 3000])
    assert lock.remaining(T0 + 3000) == 600.0
    assert lock.remaining(T0 + 3000 - set_back_s) <= 600.0


def test_clock_set_back_cannot_keep_the_keypad_locked_longer_than_max() -> None:
    # remaining(): "Seconds the keypad stays locked ... A clock set back cannot stretch it."
    # The controller refuses every key while remaining() > 0, so the value is also how long
    # an honest customer waits. After a step back of the wall clock the keypad must open
    # again within max_s of wall time, however big the step was.
    lock = make(free=1, base=30.0, max_s=600.0)
    assert lock.record_failure(T0) == 30.0
    stepped_back = T0 - 3600.0  # the clock is stepped back an hour just after the lockout
    # Asked about once a second, as a customer keeps pressing keys.
    left = [lock.remaining(stepped_back + s) for s in range(602)]
    assert left[0] <= 600.0
    assert left[-1] == 0.0, f"still locked for {left[-1]} s after {len(left) - 1} s"


def test_state_round_trips_through_asdict() -> None:
    lock = make(free=2)
    fail(lock, [T0, T0 + 1, T0 + 50])
    saved = asdict(lock.state)
    assert set(saved) == {"failures", "lockouts", "locked_until", "last_failure_at"}
    restored = make(free=2, state=LockoutState(**saved))
    assert restored.state == lock.state
    assert restored.remaining(T0 + 60) == lock.remaining(T0 + 60) > 0
    # It goes on growing from where it was, not from scratch.
    assert restored.record_failure(T0 + 200) == lock.record_failure(T0 + 200) == 120.0


def test_default_state_is_open() -> None:
    assert make().remaining(T0) == 0.0
    assert asdict(LockoutState()) == {"failures": 0, "lockouts": 0, "locked_until": 0.0,
                                      "last_failure_at": 0.0}


@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), max_size=40),
    st.floats(min_value=-1e7, max_value=1e7, allow_nan=False),
    st.integers(min_value=1, max_value=6),
)
def test_remaining_is_never_negative_nor_above_max(
    offsets: list[float], probe: float, free: int
) -> None:
    lock = make(free=free, base=15.0, max_s=900.0, forget=3600.0)
    for off in offsets:
        started = lock.record_failure(T0 + off)
        assert started is None or 15.0 <= started <= 900.0
        assert 0.0 <= lock.remaining(T0 + off) <= 900.0
    assert 0.0 <= lock.remaining(T0 + probe) <= 900.0
    restored = make(free=free, base=15.0, max_s=900.0, forget=3600.0,
                    state=LockoutState(**asdict(lock.state)))
    assert restored.remaining(T0 + probe) == lock.remaining(T0 + probe)


# -- rate limiter ----------------------------------------------------------------------------


@pytest.mark.parametrize("per_minute", [1, 6, 20])
def test_rate_limiter_allows_a_burst_then_refuses(per_minute: int) -> None:
    rl = RateLimiter(per_minute=per_minute)
    got = [rl.allow(100.0) for _ in range(per_minute + 3)]
    assert got == [True] * per_minute + [False] * 3
    assert rl.suppressed == 3


def test_rate_limiter_refills_over_time() -> None:
    rl = RateLimiter(per_minute=6)  # one token each 10 s
    assert all(rl.allow(0.0) for _ in range(6))
    assert rl.allow(0.0) is False
    assert rl.allow(5.0) is False
    assert rl.allow(10.5) is True  # one token back (0.5 + 0.55 of refill since t=5)
    assert rl.allow(10.6) is False
    # A long quiet spell refills up to the burst size, not beyond.
    assert [rl.allow(1000.0) for _ in range(8)] == [True] * 6 + [False] * 2


def test_rate_limiter_counts_and_take_suppressed_resets() -> None:
    rl = RateLimiter(per_minute=2)
    results = [rl.allow(0.0) for _ in range(5)]
    assert results.count(False) == 3
    assert rl.take_suppressed() == 3
    assert rl.suppressed == 0
    assert rl.take_suppressed() == 0
    assert rl.allow(0.1) is False
    assert rl.take_suppressed() == 1


@given(st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=200),
       st.integers(min_value=1, max_value=30))
def test_rate_limiter_never_exceeds_its_rate(gaps: list[float], per_minute: int) -> None:
    rl = RateLimiter(per_minute=per_minute)
    t = 0.0
    allowed_at: list[float] = []
    refused = 0
    for gap in gaps:
        t += gap
        if rl.allow(t):
            allowed_at.append(t)
        else:
            refused += 1
    assert rl.take_suppressed() == refused
    # Token bucket: between any two allowed items, at most the burst plus the refill passed.
    rate = per_minute / 60.0
    for i, first in enumerate(allowed_at):
        for j in range(i, len(allowed_at)):
            passed = j - i + 1
            assert passed <= per_minute + (allowed_at[j] - first) * rate + 1e-6
