"""Help at the bank, pure: every step of the help flow, its timeouts, `*` at each step, the
hourly limit and the screens (PROTOCOL section 12), with no event loop and no database."""

from __future__ import annotations

import dataclasses

import pytest

from lockerd.core import help as h
from lockerd.core.actions import Pulse, Record, Show
from lockerd.core.bank import AskHelp, Bank, BankAction, Resolve, Save
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.entry import CodeEntry
from lockerd.core.events import EventType, OutboxClass
from lockerd.core.help import HelpLimit, HelpLimitState, HelpRules, Step
from lockerd.core.lockout import Lockout, RateLimiter

pytestmark = pytest.mark.unit

T0 = 1000.0
WALL = 1_800_000_000.0
RULES = HelpRules(support_text="Call 0800 123 456", reply_timeout_s=20.0, max_per_hour=2,
                  step_timeout_s=10.0)
TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)


def _bank(*, limit: HelpLimit | None = None, rules: HelpRules = RULES) -> Bank:
    return Bank(
        compartments={"1": Compartment("1", timings=TIMINGS, occupied=True, parcel_id="PX1")},
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=3, base_s=30.0, max_s=3600.0),
        rejections=RateLimiter(per_minute=100),
        open_budget=OpenBudget(per_hour=10),
        help_rules=rules,
        help_limit=limit or HelpLimit(per_hour=rules.max_per_hour),
    )


def _keys(bank: Bank, keys: str, t: float = T0) -> list[BankAction]:
    out: list[BankAction] = []
    for key in keys:
        out += bank.key(key, t=t, wall=WALL)
    return out


def _shown(actions: list[BankAction]) -> list[tuple[str, ...]]:
    return [a.message.lines for a in actions if isinstance(a, Show)]


def _asked(bank: Bank) -> AskHelp:
    """Through both steps to the request the executor is asked to name."""
    actions = _keys(bank, "#12345#9876")
    asks = [a for a in actions if isinstance(a, AskHelp)]
    assert asks == [AskHelp("12345", "9876")]
    assert _saves(actions) == ["help_limit"]
    return asks[0]


def _saves(actions: list[BankAction]) -> list[str]:
    return [a.what for a in actions if isinstance(a, Save)]


def test_the_idle_screen_says_how_to_get_help_on_its_second_line() -> None:
    assert "#" in _bank().idle_message().lines[1]
    assert "No code" in _bank().idle_message().lines[1]


def test_hash_on_an_empty_entry_starts_help_at_the_tracking_step() -> None:
    bank = _bank()
    actions = bank.key("#", t=T0, wall=WALL)
    assert _shown(actions) == [h.ask_tracking("").lines]
    assert bank.help is not None and bank.help.step is Step.TRACKING


def test_with_help_turned_off_hash_on_an_empty_entry_does_nothing() -> None:
    bank = _bank(rules=dataclasses.replace(RULES, enabled=False))
    assert not any("No code" in line for line in bank.idle_message().lines)
    assert bank.key("#", t=T0, wall=WALL) == []
    assert bank.help is None
    # Codes work as ever.
    actions = _keys(bank, "123#")
    assert [a for a in actions if isinstance(a, Resolve)] == [Resolve("123", "keypad", False)]


def test_hash_after_digits_still_submits_a_code() -> None:
    bank = _bank()
    actions = _keys(bank, "123#")
    assert [a for a in actions if isinstance(a, Resolve)] == [Resolve("123", "keypad", False)]
    assert bank.help is None


def test_typed_tracking_then_phone_asks_for_a_request() -> None:
    bank = _bank()
    shown = _shown(_keys(bank, "#12"))
    assert shown[-1] == h.ask_tracking("12").lines
    shown = _shown(_keys(bank, "#98"))
    assert shown == [h.ask_phone(0).lines, h.ask_phone(1).lines, h.ask_phone(2).lines]
    actions = _keys(bank, "76")
    assert [a for a in actions if isinstance(a, AskHelp)] == [AskHelp("12", "9876")]


def test_hash_with_no_tracking_number_waits_for_one() -> None:
    bank = _bank()
    _keys(bank, "##")
    assert bank.help is not None and bank.help.step is Step.TRACKING


def test_any_scanned_barcode_is_the_tracking_number() -> None:
    bank = _bank()
    bank.key("#", t=T0, wall=WALL)
    actions = bank.scan("JJD0001-AB/77", t=T0, wall=WALL)
    assert _shown(actions) == [h.ask_phone(0).lines]
    assert bank.help is not None and bank.help.tracking == "JJD0001-AB/77"


@pytest.mark.parametrize("bad", ["", "x" * 65, "tab\there", "caf\u00e9"])
def test_a_scan_that_is_no_tracking_number_changes_nothing(bad: str) -> None:
    bank = _bank()
    bank.key("#", t=T0, wall=WALL)
    assert bank.scan(bad, t=T0, wall=WALL) == []
    assert bank.help is not None and bank.help.step is Step.TRACKING


def test_a_scan_at_the_phone_step_is_ignored_and_opens_nothing() -> None:
    bank = _bank()
    _keys(bank, "#1#")
    actions = bank.scan("123456", t=T0, wall=WALL)
    assert actions == []
    assert bank.help is not None and bank.help.step is Step.PHONE


@pytest.mark.parametrize("before", ["#", "#12", "#12#", "#12#98"])
def test_star_leaves_help_at_every_input_step(before: str) -> None:
    bank = _bank()
    _keys(bank, before)
    actions = bank.key("*", t=T0, wall=WALL)
    assert _shown(actions) == [h.cancelled().lines]
    assert bank.help is None
    assert bank.idle_message().lines[1] == "No code? Press #"


def test_star_leaves_while_checking() -> None:
    bank = _bank()
    ask = _asked(bank)
    bank.help_sent(ask, help_id="h-1", reference="ACDEFG", online=True, t=T0)
    assert _shown(bank.key("*", t=T0 + 1, wall=WALL)) == [h.cancelled().lines]
    assert bank.help is None


@pytest.mark.parametrize("before", ["#", "#12", "#12#", "#12#98"])
def test_an_idle_step_times_out_after_the_entry_timeout(before: str) -> None:
    bank = _bank()
    _keys(bank, before)
    assert bank.deadline() == T0 + RULES.step_timeout_s
    assert bank.tick(T0 + RULES.step_timeout_s - 0.01) == []
    actions = bank.tick(T0 + RULES.step_timeout_s)
    assert _shown(actions) == [h.help_timed_out().lines]
    assert bank.help is None


def test_each_key_restarts_the_step_timeout() -> None:
    bank = _bank()
    _keys(bank, "#1")
    _keys(bank, "2", t=T0 + 9.0)
    assert bank.tick(T0 + 10.0) == []
    assert bank.deadline() == T0 + 19.0


def test_the_request_is_recorded_before_the_screen_says_checking() -> None:
    bank = _bank()
    ask = _asked(bank)
    actions = bank.help_sent(ask, help_id="h-1", reference="ACDEFG", online=True, t=T0)
    assert isinstance(actions[0], Record) and actions[0].type == EventType.HELP_REQUESTED
    assert dict(actions[0].data) == {"help_id": "h-1", "reference": "ACDEFG",
                                     "tracking": "12345", "phone_last4": "9876"}
    assert _shown(actions) == [h.checking("ACDEFG").lines]
    assert "Checking..." in actions[1].message.lines  # type: ignore[union-attr]
    assert EventType.HELP_REQUESTED.outbox_class is OutboxClass.ACCESS


def test_no_reply_in_time_shows_the_reference_and_the_support_text() -> None:
    bank = _bank()
    bank.help_sent(_asked(bank), help_id="h-1", reference="ACDEFG", online=True, t=T0)
    assert bank.deadline() == T0 + RULES.reply_timeout_s
    # Keys other than * do nothing while the reply is awaited.
    assert bank.key("5", t=T0 + 1, wall=WALL) == []
    assert bank.tick(T0 + RULES.reply_timeout_s - 0.01) == []
    lines = _shown(bank.tick(T0 + RULES.reply_timeout_s))[0]
    assert "Ref H-ACDEFG" in lines and "Call 0800 123 456" in lines
    assert "Request will be sent" in lines
    assert bank.help is None


def test_offline_the_customer_is_told_and_given_the_reference() -> None:
    bank = _bank()
    actions = bank.help_sent(_asked(bank), help_id="h-1", reference="ACDEFG", online=False,
                             t=T0)
    assert [a.type for a in actions if isinstance(a, Record)] == [EventType.HELP_REQUESTED]
    lines = _shown(actions)[0]
    assert lines[:2] == ("Offline: saved", "Ref H-ACDEFG") and "Sent when online" in lines
    assert bank.help is None


def test_a_reply_while_waiting_is_recorded_then_shown() -> None:
    bank = _bank()
    bank.help_sent(_asked(bank), help_id="h-1", reference="ACDEFG", online=True, t=T0)
    actions = bank.help_reply("h-1", outcome="resent", message="New code sent by SMS to ***67")
    assert isinstance(actions[0], Record) and actions[0].type == EventType.HELP_ANSWERED
    assert dict(actions[0].data) == {"help_id": "h-1", "outcome": "resent"}
    assert _shown(actions) == [("New code sent by SMS", "to ***67")]
    assert bank.help is None


def test_a_late_reply_is_recorded_but_never_shown() -> None:
    bank = _bank()
    bank.help_sent(_asked(bank), help_id="h-1", reference="ACDEFG", online=True, t=T0)
    bank.tick(T0 + RULES.reply_timeout_s)
    actions = bank.help_reply("h-1", outcome="resent", message="hello")
    assert [type(a) for a in actions] == [Record]


def test_a_reply_to_another_request_is_not_shown_to_this_customer() -> None:
    bank = _bank()
    bank.help_sent(_asked(bank), help_id="h-2", reference="ACDEFG", online=True, t=T0)
    assert _shown(bank.help_reply("h-1", outcome="resent", message="hello")) == []
    assert bank.help is not None and bank.help.step is Step.CHECKING


def test_past_the_hourly_limit_only_the_support_text_and_a_counter() -> None:
    bank = _bank()
    for _ in range(RULES.max_per_hour):
        bank.help_sent(_asked(bank), help_id="h", reference="ACDEFG", online=False, t=T0)
    actions = _keys(bank, "#12345#9876")
    assert not [a for a in actions if isinstance(a, AskHelp | Record)]
    assert _saves(actions) == ["help_limit"]
    assert _shown(actions)[-1] == h.limited(RULES.support_text).lines
    assert bank.help_limit.state.refused == 1


def test_the_limit_is_a_rolling_hour_from_the_persisted_state() -> None:
    state = HelpLimitState(requests=(WALL - 3599.0, WALL - 10.0))
    limit = HelpLimit(per_hour=2, state=state)
    assert not limit.take(WALL)
    assert limit.take(WALL + 1.0)  # the oldest left the hour
    # A clock set back does not stretch the window: future times count as now.
    back = HelpLimit(per_hour=1, state=HelpLimitState(requests=(WALL + 5000.0,)))
    assert not back.take(WALL)


def test_help_never_opens_a_door_nor_tells_about_parcels() -> None:
    bank = _bank()
    actions = _keys(bank, "#")
    actions += bank.scan("PX1", t=T0, wall=WALL)
    actions += _keys(bank, "1234")
    ask = next(a for a in actions if isinstance(a, AskHelp))
    actions += bank.help_sent(ask, help_id="h-1", reference="ACDEFG", online=True, t=T0)
    actions += bank.tick(T0 + 100)
    assert not [a for a in actions if isinstance(a, Pulse | Resolve)]
    text = " ".join(" ".join(lines) for lines in _shown(actions)).lower()
    assert "parcel" not in text and "door" not in text


def test_a_locked_out_keypad_still_leaves_help_running() -> None:
    bank = _bank()
    _keys(bank, "#1")
    bank.lockout.record_failure(WALL)
    bank.lockout.record_failure(WALL)
    bank.lockout.record_failure(WALL)
    assert _shown(_keys(bank, "2")) == [h.ask_tracking("12").lines]


def test_every_help_screen_fits_20_columns_and_leads_with_16() -> None:
    long_text = "W" * 25 + " support at 0800 123 456 weekdays"
    shown = [h.ask_tracking(""), h.ask_tracking("9" * 64), h.ask_phone(0), h.ask_phone(4),
             h.checking("ACDEFG"), h.answered("x" * 80), h.answered(long_text),
             h.no_reply("ACDEFG", long_text), h.offline("ACDEFG", long_text),
             h.limited(long_text), h.cancelled(), h.help_timed_out()]
    assert [ln for msg in shown for ln in msg.lines if len(ln) > 20] == []
    assert all(1 <= len(msg.lines) <= 4 for msg in shown)
    # On a 2x16 display the first two lines carry the gist: what to do, or the reference
    # (the backend's own message is wrapped at 20 columns as it was written).
    gist = [msg.lines[0] for msg in shown if msg.indicator != "ok"]
    assert [ln for ln in gist if len(ln) > 16] == []
    for msg in (h.checking("ACDEFG"), h.no_reply("ACDEFG", "x"), h.offline("ACDEFG", "x")):
        assert msg.lines[1] == "Ref H-ACDEFG"


def test_references_use_the_unambiguous_alphabet() -> None:
    assert h.is_reference("ACDEFG") and h.is_reference("3479XY")
    assert not h.is_reference("ABCDEF")  # B looks like 8
    assert not h.is_reference("ACDEF")


def test_a_message_held_over_help_gives_the_screen_back_to_its_step() -> None:
    bank = _bank()
    _keys(bank, "#12")
    assert bank.idle_message() == h.ask_tracking("12")
    _keys(bank, "#9")
    assert bank.idle_message() == h.ask_phone(1)
    _keys(bank, "876")
    bank.help_sent(AskHelp("12", "9876"), help_id="h-1", reference="ACDEFG", online=True,
                   t=T0)
    assert bank.idle_message() == h.checking("ACDEFG")
    bank.key("*", t=T0, wall=WALL)
    assert bank.idle_message().lines[1] == "No code? Press #"
