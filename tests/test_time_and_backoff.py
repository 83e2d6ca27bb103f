"""Trusted time with a persisted floor (safety rule 7), and the reconnect backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockerd.core.backoff import Backoff
from lockerd.core.timefloor import raised_floor, trusted_now
from lockerd.services.clock import KernelSyncStatus, TrustedClock
from lockerd.store import open_database

pytestmark = pytest.mark.unit

T = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("system", "synchronised", "floor", "expected"),
    [
        (T, True, T + timedelta(days=1), T),  # NTP says the clock is right: use it
        (T, False, None, T),  # nothing signed seen yet
        (T, False, T + timedelta(days=1), T + timedelta(days=1)),  # clock behind the floor
        (T + timedelta(days=2), False, T + timedelta(days=1), T + timedelta(days=2)),
        (datetime(1970, 1, 1, tzinfo=UTC), False, T, T),  # dead RTC battery
    ],
)
def test_trusted_now(system: datetime, synchronised: bool, floor: datetime | None,
                     expected: datetime) -> None:
    assert trusted_now(system, synchronised=synchronised, floor=floor) == expected


def test_floor_only_rises() -> None:
    assert raised_floor(None, T) == T
    assert raised_floor(T, T - timedelta(hours=1)) == T
    assert raised_floor(T, T + timedelta(hours=1)) == T + timedelta(hours=1)


def test_floor_is_persisted_and_applies_when_unsynchronised(tmp_path: Path) -> None:
    db = open_database(tmp_path / "x.db")
    behind = T - timedelta(days=30)
    clock = TrustedClock(db=db, mode="never", system=lambda: behind)
    assert clock.wall() == behind
    clock.observe_signed_time(T)
    clock.observe_signed_time(T - timedelta(days=1))  # older: no change
    assert clock.wall() == T
    db.close()
    db = open_database(tmp_path / "x.db")
    again = TrustedClock(db=db, mode="never", system=lambda: behind)
    assert again.wall() == T, "the floor survives a restart"
    trusting = TrustedClock(db=db, mode="always", system=lambda: behind)
    assert trusting.wall() == behind, "a trusted (synchronised) clock is taken as it is"
    auto = TrustedClock(db=db, mode="auto", system=lambda: behind, synchronised=lambda: False)
    assert auto.wall() == T
    db.close()


def test_kernel_sync_status_answers_a_bool_and_caches() -> None:
    status = KernelSyncStatus(cache_s=60)
    first = status()
    assert isinstance(first, bool)
    assert status() is first


@given(st.floats(0.01, 5), st.floats(5, 300), st.integers(0, 2**32))
def test_backoff_stays_within_bounds_and_grows(min_s: float, max_s: float, seed: int) -> None:
    b = Backoff(min_s=min_s, max_s=max_s, rng=random.Random(seed))
    delays = [b.next() for _ in range(40)]
    assert all(0 < d <= max_s for d in delays)
    assert delays[0] <= min_s
    assert all(d >= max_s / 2 for d in delays[-5:]), "capped delays stay near the cap"
    b.reset()
    assert b.next() <= min_s


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(min_s=0, max_s=1)
    with pytest.raises(ValueError):
        Backoff(min_s=2, max_s=1)


def test_sync_status_falls_back_to_timesyncd_when_adjtimex_is_refused(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    refused = KernelSyncStatus(cache_s=0, timesync_flag=flag, adjtimex=lambda buf: -1)
    assert refused() is False
    flag.touch()
    assert refused() is True
    unsynced = KernelSyncStatus(cache_s=0, timesync_flag=flag, adjtimex=lambda buf: 5)
    assert unsynced() is False, "TIME_ERROR wins over a stale flag file"
    synced = KernelSyncStatus(cache_s=0, timesync_flag=tmp_path / "absent",
                              adjtimex=lambda buf: 0)
    assert synced() is True


@pytest.mark.parametrize("text", [
    "2026-11-29T03:00:00Z\n", "2026-11-29 03:00:00Z", "2026-11-29T03:00:00+00:00",
    "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-11-29T24:00:00Z", "tomorrow", "",
    "２０２６-11-29T03:00:00Z",
])
def test_parse_time_refuses_anything_but_rfc3339_z(text: str) -> None:
    from lockerd.timeutil import parse_time

    with pytest.raises(ValueError):
        parse_time(text)


def test_parse_time_reads_fractions_and_round_trips() -> None:
    from lockerd.timeutil import format_time, parse_time

    assert parse_time("2026-11-29T03:00:00.5Z").microsecond == 500000
    assert parse_time("2026-11-29T03:00:00.123456789Z").microsecond == 123456
    assert format_time(parse_time("2026-11-29T03:00:07Z")) == "2026-11-29T03:00:07Z"
