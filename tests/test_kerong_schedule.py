"""The Kerong poll schedule: fast while a door may move, idle otherwise, on an injected clock."""

from __future__ import annotations

import pytest

from hal.kerong.schedule import PollSchedule

pytestmark = pytest.mark.unit


def schedule(now: float = 0.0) -> PollSchedule:
    return PollSchedule(fast_s=0.1, idle_s=2.0, linger_s=5.0, now=now)


def test_fast_for_a_while_after_start_then_idle() -> None:
    s = schedule(now=100.0)
    assert s.mode(100.0) == "fast" and s.interval(104.9) == 0.1
    assert s.mode(105.0) == "idle" and s.interval(105.0) == 2.0


def test_a_pulse_makes_it_fast_for_the_linger_time() -> None:
    s = schedule()
    assert s.mode(10.0) == "idle"
    s.pulse_sent(10.0)
    assert s.mode(10.0) == "fast" and s.mode(14.99) == "fast"
    assert s.mode(15.0) == "idle"


def test_an_open_door_keeps_it_fast_however_long_it_stands_open() -> None:
    s = schedule()
    s.pulse_sent(10.0)
    s.doors_open(True)
    assert s.mode(1000.0) == "fast"
    # Shut: the change keeps it fast a while longer, then idle.
    s.doors_open(False)
    s.changed(1000.0)
    assert s.mode(1004.0) == "fast" and s.mode(1005.0) == "idle"


def test_a_change_seen_while_idle_makes_it_fast() -> None:
    s = schedule()
    s.changed(50.0)
    assert s.mode(54.0) == "fast" and s.mode(55.5) == "idle"


def test_an_earlier_linger_never_shortens_a_later_one() -> None:
    s = schedule()
    s.pulse_sent(20.0)
    s.changed(18.0)  # reported late: must not cut the pulse's linger short
    assert s.mode(24.0) == "fast"


def test_the_next_round_is_brought_forward_by_a_pulse() -> None:
    s = schedule()
    # Idle: the round after the one that ended at 30 is due at 32.
    assert s.next_round_at(30.0, 30.0) == 32.0
    s.pulse_sent(30.5)
    assert s.next_round_at(30.0, 30.5) == pytest.approx(30.1)


def test_a_zero_linger_polls_fast_only_while_a_door_is_open() -> None:
    s = PollSchedule(fast_s=0.1, idle_s=1.0, linger_s=0.0, now=0.0)
    s.pulse_sent(1.0)
    assert s.mode(1.0) == "idle"
    s.doors_open(True)
    assert s.mode(1.0) == "fast"


@pytest.mark.parametrize(("fast", "idle", "linger"), [(0.0, 1.0, 1.0), (2.0, 1.0, 1.0),
                                                      (0.1, 1.0, -1.0)])
def test_bad_timings_are_refused(fast: float, idle: float, linger: float) -> None:
    with pytest.raises(ValueError):
        PollSchedule(fast_s=fast, idle_s=idle, linger_s=linger, now=0.0)
