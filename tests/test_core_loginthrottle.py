"""The console's login throttle core: per-connection and per-issuer lockouts, persistence."""

from __future__ import annotations

import pytest

from lockerd.core.loginthrottle import (
    MAX_ISSUERS,
    ConnectionThrottle,
    IssuerLockouts,
    ThrottleSettings,
)

pytestmark = pytest.mark.unit

SETTINGS = ThrottleSettings(free_attempts=3, base_s=30.0, max_s=600.0)


def test_an_issuer_locks_on_its_own_failures_only() -> None:
    locks = IssuerLockouts(SETTINGS)
    assert locks.record_failure("tech:a", 100.0) is None
    assert locks.record_failure("tech:b", 100.0) is None
    assert locks.record_failure("tech:a", 101.0) is None
    assert locks.record_failure("tech:a", 102.0) == 30.0
    assert locks.remaining("tech:a", 110.0) == 22.0
    assert locks.remaining("tech:b", 110.0) == 0.0
    assert locks.remaining("tech:never-seen", 110.0) == 0.0
    assert locks.record_success("tech:a") is True
    assert locks.record_success("tech:a") is False
    assert locks.remaining("tech:a", 110.0) == 0.0


def test_issuer_lockouts_survive_a_round_trip_through_the_meta_table() -> None:
    locks = IssuerLockouts(SETTINGS)
    for t in (1.0, 2.0, 3.0):
        locks.record_failure("key:abc", t)
    locks.record_failure("tech:t-1", 3.0)
    again = IssuerLockouts.from_meta(SETTINGS, locks.to_meta())
    assert again.remaining("key:abc", 13.0) == 20.0
    assert again.lockouts["tech:t-1"].state.failures == 1


def test_meta_in_another_shape_starts_empty() -> None:
    # The global lockout of earlier versions, a hand edit, junk: never a crash.
    raw: object
    for raw in [None, 7, "x", [], {"failures": 5, "lockouts": 1, "locked_until": 9e9,
                                   "last_failure_at": 1.0},
                {"issuers": []}, {"issuers": {"tech:a": {"bogus": 1}, "tech:b": 3}}]:
        assert IssuerLockouts.from_meta(SETTINGS, raw).lockouts == {}


def test_the_number_of_issuers_held_is_bounded_and_locked_ones_are_kept() -> None:
    locks = IssuerLockouts(ThrottleSettings(free_attempts=3, base_s=1e6, max_s=1e6))
    for _ in range(3):
        locks.record_failure("tech:locked", 0.0)
    for i in range(MAX_ISSUERS + 10):
        locks.record_failure(f"key:{i}", 1.0 + i)
    assert len(locks.lockouts) == MAX_ISSUERS
    assert locks.remaining("tech:locked", 5.0) > 0
    assert "key:0" not in locks.lockouts, "the longest quiet issuer is forgotten first"


def test_a_connection_keeps_junk_and_refused_tokens_apart() -> None:
    conn = ConnectionThrottle.new(SETTINGS)
    for t in (1.0, 2.0, 3.0):
        conn.junk.record_failure(t)
    assert conn.junk.remaining(4.0) > 0
    assert conn.refused.remaining(4.0) == 0.0
    conn.clear()
    assert conn.junk.remaining(4.0) == 0.0
