"""The transcript's pieces: an event in one line, when to colour, a terminal that went away."""

from __future__ import annotations

import io
from typing import Any

import pytest

from lockerd.dev.transcript import Output, describe_event, event_kind, use_colour
from lockerd.store.events import StoredEvent

pytestmark = pytest.mark.unit


def _event(type_: str, *, compartment: str | None = None, code_id: str | None = None,
           **data: Any) -> StoredEvent:
    return StoredEvent(seq=7, event_id="e", type=type_, at="2026-01-01T00:00:00Z",
                       compartment=compartment, code_id=code_id, data=data)


def test_an_event_line_has_the_parts_its_event_has() -> None:
    assert describe_event(_event("daemon.started")) == "event #7 daemon.started"
    assert describe_event(_event("code.rejected", reason="unknown_code", source="keypad")) \
        == "event #7 code.rejected reason unknown_code"
    assert describe_event(_event("pickup.opened", compartment="4", code_id="derived:PX9",
                                 parcel_id="PX9")) \
        == "event #7 pickup.opened door 4 code derived:PX9 parcel PX9"


def test_a_token_is_named_with_what_the_demo_knows_of_it() -> None:
    cti = "ab" * 16
    opened = _event("pickup.opened", compartment="5", cti=cti, parcel_id="PX8")
    assert describe_event(opened) == f"event #7 pickup.opened door 5 token {cti} parcel PX8"
    known = {cti: "pickup QR token for parcel PX8"}
    assert describe_event(opened, known) \
        == f"event #7 pickup.opened door 5 token {cti} (pickup QR token for parcel PX8)"
    pulse = _event("lock.pulse", compartment="5", cti=cti, kind="pickup")
    assert describe_event(pulse) == f"event #7 lock.pulse door 5 token {cti} (pickup token)"


def test_event_colours() -> None:
    assert event_kind("pickup.completed") == "good"
    assert event_kind("code.rejected") == "bad"
    assert event_kind("door.closed") == "event"


class _TerminalText(io.StringIO):
    """Text that says it is a terminal, as sys.stdout in a terminal window does."""

    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color() -> None:
    assert not use_colour(io.StringIO(), {})
    tty = _TerminalText()
    assert use_colour(tty, {"TERM": "xterm"})
    assert use_colour(tty, {"TERM": "xterm", "NO_COLOR": ""})  # empty: not set
    assert not use_colour(tty, {"TERM": "xterm", "NO_COLOR": "1"})
    assert not use_colour(tty, {"TERM": "dumb"})
    closed = io.StringIO()
    closed.close()
    assert not use_colour(closed, {})  # a closed stream: ValueError, no colour


def test_the_prompt_stays_below_the_lines_printed_while_it_waits() -> None:
    stream = io.StringIO()
    out = Output(stream, prompt="bank> ")
    out.line("before")
    out.ask()
    out.line("  [door 1] opened", "door")
    out.answered()
    out.line("after")
    assert stream.getvalue() == "before\nbank> \r\x1b[K  [door 1] opened\nbank> after\n"
    painted = io.StringIO()
    coloured = Output(painted, colour=True)
    coloured.line("refused", "error")
    coloured.line("plain")
    assert painted.getvalue() == "\x1b[31mrefused\x1b[0m\nplain\n"


def test_a_terminal_gone_is_written_to_no_more_and_raises_nothing() -> None:
    stream = io.StringIO()
    out = Output(stream)
    stream.close()
    out.line("the terminal was closed")  # ValueError from the closed stream: swallowed
    assert out.gone
    out.line("still nothing raised")
