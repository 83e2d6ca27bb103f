"""The simulator UI driven as a person would, by Textual's Pilot, over a real daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import running
from textual import events
from textual.pilot import Pilot
from textual.widgets import Static
from uikit import (
    COURIER,
    PICKUPS,
    SIZE,
    app_of,
    event_types,
    running_ui,
    ui_kit,
    wait_event,
    wait_ui,
)

from lockerd.dev.ui.app import LockerUi
from lockerd.dev.ui.link import BankLink
from lockerd.dev.ui.widgets import CompartmentCell, DisplayPanel
from lockerd.services.banksetup import DB_NAME

pytestmark = pytest.mark.e2e


def _cell(pilot: Pilot[None], cid: str) -> CompartmentCell:
    return app_of(pilot).query_one(f"#cell-{cid}", CompartmentCell)


def _text(ui: LockerUi, selector: str) -> str:
    return str(ui.query_one(selector, Static).content)


def _shown(pilot: Pilot[None]) -> str:
    return str(app_of(pilot).query_one(DisplayPanel).content)


def _key_id(key: str) -> str:
    return "#key-" + {"*": "star", "#": "hash"}.get(key, key)


async def test_a_pickup_by_clicking_the_keypad(bank_dir: Path) -> None:
    kit = ui_kit(bank_dir)
    async with running_ui(kit) as pilot:
        ui = app_of(pilot)
        # A person first tries the latched door: refused, said why, and nothing stops.
        await pilot.press("o")
        assert "simulator: compartment 1 is locked" in _text(ui, "#status")
        assert ui.query_one("#status").has_class("error")
        await pilot.press("s", "enter")  # an empty scan reads nothing
        assert "reads nothing" in _text(ui, "#status")
        await pilot.press("escape")
        for n, key in enumerate(PICKUPS["1"], start=1):  # 111222: the same key quickly again
            await pilot.click(_key_id(key))
            await wait_ui(pilot, lambda n=n: "Code: " + "*" * n + " " in _shown(pilot),
                          what=f"{n} keys on the display")
        await pilot.click(_key_id("#"))
        await wait_event(pilot, "pickup.opened", compartment="1")
        await wait_ui(pilot, lambda: _cell(pilot, "1").has_class("open", "latest"),
                      what="compartment 1 shown open and highlighted")
        assert "OPEN" in str(_cell(pilot, "1").content)
        assert "Door 1 is open" in str(ui.query_one(DisplayPanel).content)
        line = next(e for e in ui.events_seen if e.type == "pickup.opened")
        assert line.code_id == "p-1001"
        # The customer takes the parcel and shuts the door, from the keyboard this time.
        await pilot.press("t", "c")
        await wait_event(pilot, "pickup.completed", compartment="1")
        await wait_ui(pilot, lambda: not _cell(pilot, "1").has_class("open"),
                      what="compartment 1 shown closed")
        assert "empty" in str(_cell(pilot, "1").content)
        # A QR token pasted on the main screen is scanned as it is.
        ui.post_message(events.Paste(kit.qr_token("pickup", compartment="3")))
        await wait_event(pilot, "pickup.opened", compartment="3")


async def test_a_jam_is_shown_and_cleared_and_the_compartment_goes_back_into_service(
        bank_dir: Path) -> None:
    # No guided retry: the jammed compartment goes out of service at once.
    kit = ui_kit(bank_dir, doors={"pulse_s": 0.2, "open_timeout_s": 0.3, "jam_retry_s": 0.0})
    async with running_ui(kit) as pilot:
        ui = app_of(pilot)
        await pilot.click("#cell-2")
        assert ui.selected == "2"
        await pilot.press("j")
        await wait_ui(pilot, lambda: _cell(pilot, "2").has_class("jammed"),
                      what="compartment 2 shown jammed")
        assert "JAMMED" in str(_cell(pilot, "2").content)
        await pilot.press(*PICKUPS["2"], "enter")
        await wait_event(pilot, "door.jammed", compartment="2")
        await wait_event(pilot, "compartment.out_of_service", compartment="2")
        await wait_ui(pilot, lambda: _cell(pilot, "2").has_class("out"),
                      what="compartment 2 shown out of service")
        await pilot.press("j")  # the technician frees the lock
        await wait_ui(pilot, lambda: not _cell(pilot, "2").has_class("jammed"),
                      what="the jam cleared")
        await pilot.press("i")
        await wait_event(pilot, "compartment.in_service", compartment="2")
        await wait_ui(pilot, lambda: not _cell(pilot, "2").has_class("out"),
                      what="compartment 2 shown in service")
        # The code was not used by the jam: it opens the door now.
        await pilot.press(*PICKUPS["2"], "enter")
        await wait_event(pilot, "pickup.opened", compartment="2")


async def test_a_courier_deposit(bank_dir: Path) -> None:
    async with running_ui(ui_kit(bank_dir)) as pilot:
        ui = app_of(pilot)
        await pilot.press(*COURIER, "enter")
        await wait_event(pilot, "session.started")
        await pilot.press("s", *"PX200", "enter")  # the scanner reads the parcel's label
        await wait_ui(pilot, lambda: "size" in str(ui.query_one(DisplayPanel).content).lower(),
                      what="the display asking for a size")
        await pilot.press("1")  # small: the smallest free door of size S or larger opens
        await wait_event(pilot, "deposit.opened")
        cid = next(e.compartment for e in ui.events_seen if e.type == "deposit.opened")
        assert cid is not None
        # The door that opened is selected: the courier's hands go there.
        await wait_ui(pilot, lambda: ui.selected == cid, what=f"compartment {cid} selected")
        await pilot.press("p", "c")
        await wait_event(pilot, "deposit.confirmed", compartment=cid)
        confirmed = next(e for e in ui.events_seen if e.type == "deposit.confirmed")
        assert confirmed.data["parcel_id"] == "PX200"
        await wait_ui(pilot, lambda: "(PX200, derived)" in _text(ui, "#codes"),
                      what="the derived pickup code of PX200 among the codes")
        await pilot.press("asterisk")
        await wait_event(pilot, "session.ended")


async def test_the_tour_plays_in_the_ui_with_a_line_per_step(bank_dir: Path) -> None:
    async with running_ui(ui_kit(bank_dir), tour=True) as pilot:
        ui = app_of(pilot)
        await wait_ui(pilot, lambda: ui.tour_result is not None, what="the tour to end",
                      timeout=40.0)
        assert ui.tour_result is True, _text(ui, "#narration")
        assert _text(ui, "#narration").startswith("Tour over")
        assert {"deposit.confirmed", "pickup.completed", "help.requested",
                "door.jammed"} <= set(event_types(pilot))


async def test_attached_to_a_daemon_by_its_socket_and_database_alone(bank_dir: Path) -> None:
    kit = ui_kit(bank_dir)
    async with running(kit) as daemon:
        link = BankLink.attach(socket=kit.socket_path, db=kit.state_dir / DB_NAME)
        ui = LockerUi(link, list(kit.compartments))
        async with ui.run_test(size=SIZE) as pilot:
            await wait_event(pilot, "daemon.started")
            await pilot.press(*PICKUPS["1"], "enter")
            await wait_event(pilot, "pickup.opened", compartment="1")
            await wait_ui(pilot, lambda: _cell(pilot, "1").has_class("open"),
                          what="compartment 1 shown open")
            # What needs the demo's own daemon says so, and changes nothing.
            await pilot.press("i")
            assert "needs the daemon in this process" in _text(ui, "#status")
            await pilot.press("r")
            assert "need the demo's keys" in _text(ui, "#status")
            # The daemon goes away: the UI says so and stays up.
            daemon.app.request_stop()
            await wait_ui(pilot, lambda: "cannot reach the bank" in _text(ui, "#status"),
                          what="the UI to notice the daemon is gone")
            assert ui.is_running
        await link.close()
