"""Help through the executor with a real SQLite file: the request is durable before the
display says it was sent, the limit is saved, and a reply reaches the screen."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_controller import ManualClock

from hal.base import DisplayMessage, KeyPressed, Scanned
from hal.registry import HalContext
from lockerd.core.bank import Bank
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.entry import CodeEntry
from lockerd.core.help import HelpLimit, HelpRules
from lockerd.core.lockout import Lockout, RateLimiter
from lockerd.services.controller import Controller, load_help_limit_state
from lockerd.services.credentials import CredentialService
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.events import EventLog
from lockerd.store.parcels import SpentTokens
from sim.backend import SimDisplay, SimLockDriver

pytestmark = pytest.mark.unit

TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)


class WatchedDisplay(SimDisplay):
    """The simulated display, noting which events were durable as each screen went up."""

    events: EventLog
    seen: list[tuple[str, list[str]]]

    async def show(self, message: DisplayMessage) -> None:
        self.seen.append((message.lines[0], [e.type for e in self.events.recent(100)]))
        await super().show(message)


def _controller(tmp_path: Path, *, online: bool) -> tuple[Controller, WatchedDisplay, Database]:
    db = open_database(tmp_path / "lockerd.db")
    events, codes = EventLog(db), CodeStore(db)
    context = HalContext(compartments=("1",), state_dir=tmp_path, compartment_sizes={"1": "M"})
    display = WatchedDisplay(options={}, context=context, config_key="hal.display")
    display.events, display.seen = events, []
    rules = HelpRules(max_per_hour=1)
    bank = Bank(
        compartments={"1": Compartment("1", timings=TIMINGS, size="M")},
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=2, base_s=30.0, max_s=600.0),
        rejections=RateLimiter(per_minute=20), open_budget=OpenBudget(per_hour=5),
        help_rules=rules, help_limit=HelpLimit(per_hour=1, state=load_help_limit_state(db)))
    tokens = SpentTokens(db)
    ctl = Controller(
        bank=bank, credentials=CredentialService(locker_id="L1", codes=codes,
                                                 code_key=bytes(32), tokens=tokens),
        db=db, events=events, codes=codes,
        lock=SimLockDriver(options={}, context=context, config_key="hal.lock"),
        display=display, pulse_s=0.05, clock=ManualClock(), tokens=tokens,
        online=lambda: online)
    return ctl, display, db


async def _ask(ctl: Controller) -> None:
    await ctl.step(KeyPressed("#"))
    await ctl.step(Scanned("JJD-1"))
    for key in "9876":
        await ctl.step(KeyPressed(key))


@pytest.mark.parametrize("online", [True, False])
async def test_the_request_is_durable_before_the_screen_says_it_was_sent(
        tmp_path: Path, online: bool) -> None:
    ctl, display, db = _controller(tmp_path, online=online)
    await _ask(ctl)
    first, durable = display.seen[-1]
    assert first == ("Checking..." if online else "Offline: saved")
    assert durable == ["help.requested"]
    assert [line for line, _ in display.seen[:-1]] == ["Tracking number?",
                                                       *["Phone, last 4?"] * 4]
    assert all(events == [] for _, events in display.seen[:-1])
    stored = EventLog(db).recent(10)[0].data
    assert ctl.help_requests.get(stored["help_id"]) is not None


async def test_a_reply_reaches_the_screen_and_is_recorded_first(tmp_path: Path) -> None:
    ctl, display, db = _controller(tmp_path, online=True)
    await _ask(ctl)
    help_id = str(EventLog(db).recent(1)[0].data["help_id"])
    await ctl.help_reply(help_id, outcome="resent", message="New code sent by SMS to ***67")
    line, durable = display.seen[-1]
    assert line == "New code sent by SMS" and durable[-1] == "help.answered"
    request = ctl.help_requests.get(help_id)
    assert request is not None and request.answered


async def test_the_limit_is_saved_and_read_back_after_a_restart(tmp_path: Path) -> None:
    ctl, _, db = _controller(tmp_path, online=True)
    await _ask(ctl)
    db.close()
    ctl, display, db = _controller(tmp_path, online=True)
    await _ask(ctl)
    assert display.seen[-1][0] == "Help is busy"
    assert [e.type for e in EventLog(db).recent(10)] == ["help.requested"]
    assert load_help_limit_state(db).refused == 1
