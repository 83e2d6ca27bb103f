"""Keypad buffer: digits, clear, enter, timeout, overflow, invalid and stuck keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockerd.core.entry import (
    Cleared,
    CodeEntry,
    EntryOutcome,
    InvalidKey,
    StuckKey,
    Submitted,
    TimedOut,
    TooLong,
    Typing,
)

pytestmark = pytest.mark.unit

TIMEOUT = 10.0
MAX_DIGITS = 8
STUCK = 12


def make(
    *, timeout_s: float = TIMEOUT, max_digits: int = MAX_DIGITS, stuck: int = STUCK
) -> CodeEntry:
    return CodeEntry(timeout_s=timeout_s, max_digits=max_digits, stuck_key_repeats=stuck)


def feed(
    entry: CodeEntry, keys: str, *, start: float = 0.0, step: float = 1.0
) -> list[EntryOutcome]:
    """Press each key one `step` after the last; return all outcomes in order."""
    out: list[EntryOutcome] = []
    t = start
    for key in keys:
        out += entry.press(key, t)
        t += step
    return out


@pytest.mark.parametrize(
    ("keys", "expected", "count_after"),
    [
        ("1", [Typing(1)], 1),
        ("123", [Typing(1), Typing(2), Typing(3)], 3),
        ("12*", [Typing(1), Typing(2), Cleared()], 0),
        ("*", [Cleared()], 0),
        ("12*3", [Typing(1), Typing(2), Cleared(), Typing(1)], 1),
        ("1234#", [Typing(1), Typing(2), Typing(3), Typing(4), Submitted("1234")], 0),
        ("#", [], 0),
        ("##", [], 0),
        ("1*#", [Typing(1), Cleared()], 0),
        ("12#34#", [Typing(1), Typing(2), Submitted("12"), Typing(1), Typing(2),
                    Submitted("34")], 0),
        ("0000#", [Typing(1), Typing(2), Typing(3), Typing(4), Submitted("0000")], 0),
        ("111111#", [*(Typing(n) for n in range(1, 7)), Submitted("111111")], 0),
    ],
)
def test_key_sequences(keys: str, expected: list[EntryOutcome], count_after: int) -> None:
    entry = make()
    assert feed(entry, keys) == expected
    assert entry.count == count_after


def test_submit_empties_the_buffer_and_the_next_code_starts_fresh() -> None:
    entry = make()
    feed(entry, "987#")
    assert entry.count == 0
    assert entry.deadline() is None
    assert feed(entry, "5#", start=10.0) == [Typing(1), Submitted("5")]


def test_deadline_is_none_when_nothing_is_typed() -> None:
    entry = make()
    assert entry.deadline() is None
    entry.press("*", 1.0)
    assert entry.deadline() is None
    entry.press("#", 2.0)
    assert entry.deadline() is None


def test_deadline_follows_the_last_key() -> None:
    entry = make()
    entry.press("1", 100.0)
    assert entry.deadline() == 100.0 + TIMEOUT
    entry.press("2", 103.0)
    assert entry.deadline() == 103.0 + TIMEOUT


@pytest.mark.parametrize(
    ("tick_at", "times_out"),
    [
        (100.0, False),
        (100.0 + TIMEOUT - 0.001, False),
        (100.0 + TIMEOUT, True),
        (100.0 + TIMEOUT + 500.0, True),
    ],
)
def test_tick_before_and_after_the_deadline(tick_at: float, times_out: bool) -> None:
    entry = make()
    entry.press("4", 99.0)
    entry.press("2", 100.0)
    result = entry.tick(tick_at)
    if times_out:
        assert result == TimedOut()
        assert entry.count == 0
        assert entry.deadline() is None
        # Once emptied, the timeout does not fire again.
        assert entry.tick(tick_at + 100.0) is None
    else:
        assert result is None
        assert entry.count == 2


def test_tick_on_an_empty_buffer_never_times_out() -> None:
    entry = make()
    assert entry.tick(0.0) is None
    assert entry.tick(1e9) is None


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("7", [TimedOut(), Typing(1)]),
        ("*", [TimedOut(), Cleared()]),
        ("#", [TimedOut()]),
    ],
)
def test_key_after_the_timeout_reports_it_first_and_starts_a_new_code(
    key: str, expected: list[EntryOutcome]
) -> None:
    entry = make()
    feed(entry, "123", start=0.0)  # last key at t=2
    assert entry.press(key, 2.0 + TIMEOUT) == expected
    # The old digits are gone: entering now submits only what came after the timeout.
    out = entry.press("#", 2.0 + TIMEOUT + 1.0)
    if key == "7":
        assert out == [Submitted("7")]
    else:
        assert out == []


def test_key_just_before_the_timeout_keeps_the_code() -> None:
    entry = make()
    feed(entry, "12", start=0.0)  # last key at t=1
    assert entry.press("3", 1.0 + TIMEOUT - 0.01) == [Typing(3)]
    assert entry.press("#", 1.0 + 2 * TIMEOUT - 0.02) == [Submitted("123")]


def test_max_digits_fills_then_overflow_reports_too_long_and_empties() -> None:
    entry = make(max_digits=4)
    assert feed(entry, "1234") == [Typing(1), Typing(2), Typing(3), Typing(4)]
    assert entry.press("5", 10.0) == [TooLong()]
    assert entry.count == 0
    assert entry.deadline() is None
    # Nothing of the overlong code survives.
    assert entry.press("#", 11.0) == []
    assert feed(entry, "98#", start=12.0) == [Typing(1), Typing(2), Submitted("98")]


@pytest.mark.parametrize("key", ["a", "", "10", " ", "A", "+", "**", "\n", "٣"])
def test_invalid_key_is_reported_and_changes_nothing(key: str) -> None:
    entry = make()
    feed(entry, "12")
    deadline = entry.deadline()
    assert entry.press(key, 1.5) == [InvalidKey(key)]
    assert entry.count == 2
    assert entry.deadline() == deadline
    assert entry.press("#", 2.0) == [Submitted("12")]


def test_stuck_key_reported_once_per_run_and_input_refused_until_another_key() -> None:
    entry = make(stuck=5, max_digits=16)
    out = feed(entry, "7" * 4)
    assert out == [Typing(1), Typing(2), Typing(3), Typing(4)]
    # The fifth identical key in a row: a stuck key, and the buffer it flooded is dropped.
    assert entry.press("7", 10.0) == [StuckKey("7")]
    assert entry.count == 0
    # The run goes on: refused silently, reported no more.
    for i in range(20):
        assert entry.press("7", 11.0 + i * 0.1) == []
    assert entry.count == 0
    # Another key ends the run and is taken normally.
    assert entry.press("3", 20.0) == [Typing(1)]
    assert entry.press("#", 20.5) == [Submitted("3")]


def test_stuck_key_is_reported_again_on_a_new_run() -> None:
    entry = make(stuck=4)
    assert feed(entry, "9999").count(StuckKey("9")) == 1
    entry.press("*", 10.0)
    out = feed(entry, "9999", start=11.0)
    assert out.count(StuckKey("9")) == 1
    assert out[-1] == StuckKey("9")


@pytest.mark.parametrize("key", ["#", "*"])
def test_stuck_function_key_is_reported(key: str) -> None:
    entry = make(stuck=3)
    out = feed(entry, key * 10)
    assert out.count(StuckKey(key)) == 1


def test_invalid_keys_do_not_break_a_stuck_run() -> None:
    entry = make(stuck=4)
    out: list[EntryOutcome] = []
    for i, key in enumerate("5x5x5x5"):
        out += entry.press(key, float(i))
    assert out.count(StuckKey("5")) == 1


@pytest.mark.parametrize("length", [1, 5, 11])
def test_repeated_digits_below_the_stuck_threshold_work(length: int) -> None:
    entry = make(stuck=12, max_digits=16)
    out = feed(entry, "1" * length + "#")
    assert out[-1] == Submitted("1" * length)
    assert not any(isinstance(o, StuckKey) for o in out)


# -- properties ------------------------------------------------------------------------------

keys_st = st.lists(
    st.tuples(st.sampled_from("0123456789*#x"), st.floats(min_value=0.0, max_value=25.0)),
    max_size=80,
)


@given(keys_st)
def test_buffer_never_exceeds_max_digits_and_typing_matches_count(
    presses: list[tuple[str, float]],
) -> None:
    entry = make(max_digits=6, stuck=5)
    t = 0.0
    for key, dt in presses:
        t += dt
        for outcome in entry.press(key, t):
            if isinstance(outcome, Typing):
                assert outcome.count == entry.count
            if isinstance(outcome, Submitted):
                assert 1 <= len(outcome.code) <= 6
                assert set(outcome.code) <= set("0123456789")
        assert 0 <= entry.count <= 6
        assert (entry.deadline() is None) == (entry.count == 0)


@given(keys_st)
def test_submitted_code_is_exactly_the_digits_typed_since_the_last_reset(
    presses: list[tuple[str, float]],
) -> None:
    entry = make(max_digits=6, stuck=5)
    model = ""
    t = 0.0
    for key, dt in presses:
        t += dt
        for outcome in entry.press(key, t):
            match outcome:
                case Typing():
                    model += key
                case Submitted(code=code):
                    assert code == model
                    model = ""
                case Cleared() | TimedOut() | TooLong() | StuckKey():
                    model = ""
                case InvalidKey():
                    pass
        assert entry.count == len(model)


@given(st.sampled_from("0123456789*#"), st.integers(min_value=3, max_value=30),
       st.integers(min_value=0, max_value=60))
def test_stuck_key_reported_exactly_once_per_run(key: str, threshold: int, extra: int) -> None:
    entry = make(stuck=threshold, max_digits=64)
    out = feed(entry, key * (threshold + extra), step=0.01)
    assert out.count(StuckKey(key)) == 1
