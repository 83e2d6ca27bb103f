"""Deposits end to end on the simulator: courier sessions, drop-off codes, size assignment."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Running, running, wait_until

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store.parcels import ParcelStore

pytestmark = pytest.mark.e2e

COURIER = "700700"
DROP = "800800"
SIZES = ["S", "S", "M", "M", "L", "L"]  # compartments 1-6


def courier_code(**kw: object) -> PlainCode:
    fields: dict[str, object] = {"id": "c-1", "code": COURIER, "compartment": None,
                                 "kind": "courier"}
    fields.update(kw)
    return PlainCode(**fields)  # type: ignore[arg-type]


def drop_code(**kw: object) -> PlainCode:
    fields: dict[str, object] = {"id": "d-1", "code": DROP, "compartment": None,
                                 "kind": "deposit"}
    fields.update(kw)
    return PlainCode(**fields)  # type: ignore[arg-type]


def bank(make_kit: Callable[..., BankKit], codes: list[PlainCode], **kw: object) -> BankKit:
    kw.setdefault("compartments", len(SIZES))
    kw.setdefault("sizes", SIZES)
    return make_kit(codes, **kw)


def uses(r: Running, code: str) -> int:
    record = r.app.codes.lookup(r.kit.digest(code))
    assert record is not None
    return record.uses


async def deposit(r: Running, parcel_id: str, size_key: str, *, count: int) -> str:
    """Scan a label, choose a size, put the parcel in the door that opens and close it."""
    r.world.scan_label(parcel_id)
    await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
    r.world.press(size_key)
    opened = await r.wait_event("door.opened", count=count)
    cid = opened.compartment
    assert cid is not None
    r.world.set_parcel(cid, True)
    r.world.close_door(cid)
    return cid


async def test_courier_session_deposits_two_parcels_and_ends_with_star(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = bank(make_kit, [courier_code()])
    async with running(kit) as r:
        r.world.press(COURIER + "#")
        started = await r.wait_event("session.started")
        assert (started.code_id, started.data["kind"]) == ("c-1", "courier")
        await wait_until(lambda: "scan label" in r.display(), what="the label prompt")
        # No door has opened: the courier code is not used yet.
        assert uses(r, COURIER) == 0

        first = await deposit(r, "PX-1", "1", count=1)
        confirmed = await r.wait_event("deposit.confirmed")
        assert first == "1", "the smallest free compartment of the chosen size"
        assert (confirmed.compartment, confirmed.code_id) == ("1", "c-1")
        assert confirmed.data["parcel_id"] == "PX-1"
        # The event that reports the door open is the one that used the code.
        assert uses(r, COURIER) == 1
        await wait_until(lambda: "1 deposited" in r.display(), what="the next-label prompt")

        second = await deposit(r, "PX-2", "2", count=2)
        await r.wait_event("deposit.confirmed", count=2)
        assert second == "3"
        assert uses(r, COURIER) == 1, "one session is one use, however many doors"

        r.world.press("*")
        ended = await r.wait_event("session.ended")
        assert ended.data["reason"] == "ended_by_user"
        assert ended.data["deposits"] == 2
        await r.wait_display("Session ended")
        assert {c: p.parcel_id for c, p in ParcelStore(r.app.db).all().items()} == {
            "1": "PX-1", "3": "PX-2"}
        # The keypad is the customers' again: a courier code once used is refused.
        r.world.press(COURIER + "#")
        refused = await r.wait_event("code.rejected")
        assert refused.data["reason"] == "used"


async def test_deposit_is_confirmed_only_when_the_sensor_sees_the_parcel(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = bank(make_kit, [drop_code(parcel_id="PX-9")])
    async with running(kit) as r:
        r.world.press(DROP + "#")
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
        r.world.press("3")
        opened = await r.wait_event("door.opened")
        assert opened.compartment == "5"
        assert uses(r, DROP) == 1
        r.world.close_door("5")  # closed without putting the parcel in
        aborted = await r.wait_event("deposit.aborted")
        assert aborted.data["reason"] == "empty"
        assert aborted.data["parcel_id"] == "PX-9"
        assert r.events("deposit.confirmed") == []
        await r.wait_display("closed empty")
        # A drop-off that did not happen gives its code back, and the compartment is free.
        assert uses(r, DROP) == 0
        assert r.app.controller.compartments["5"].parcel_id is None
        assert ParcelStore(r.app.db).all() == {}
        await r.wait_event("session.ended")

        # The same code works again, the same compartment is chosen, and this time the
        # parcel goes in.
        r.world.press(DROP + "#")
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt again")
        r.world.press("3")
        again = await r.wait_event("door.opened", count=2)
        assert again.compartment == "5"
        r.world.set_parcel("5", True)
        r.world.close_door("5")
        confirmed = await r.wait_event("deposit.confirmed")
        assert (confirmed.compartment, confirmed.data["parcel_id"]) == ("5", "PX-9")
        ended = await r.wait_event("session.ended", count=2)
        assert ended.data["reason"] == "confirmed"
        assert uses(r, DROP) == 1


async def test_assignment_skips_occupied_out_of_service_and_too_small_doors(
    make_kit: Callable[..., BankKit],
) -> None:
    # 1:S free, 2:S free, 3:M holds a parcel, 4:M out of service, 5:L free, 6:L free
    kit = bank(make_kit, [courier_code(max_uses=3)], parcels=["3"])
    async with running(kit) as r:
        await r.app.controller.set_service("4", False, "maintenance")
        r.world.press(COURIER + "#")
        await wait_until(lambda: "scan label" in r.display(), what="the label prompt")
        cid = await deposit(r, "PX-M", "2", count=1)
        assert cid == "5", "M is taken or out of service: the next size up"
        await r.wait_event("deposit.confirmed")
        cid = await deposit(r, "PX-L", "3", count=2)
        assert cid == "6"
        await r.wait_event("deposit.confirmed", count=2)

        # Nothing of size L or M is free any more.
        r.world.scan_label("PX-BIG")
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
        r.world.press("3")
        refused = await r.wait_event("deposit.refused")
        assert refused.data == {"kind": "courier", "source": "keypad",
                                "reason": "no_free_compartment", "parcel_id": "PX-BIG",
                                "size": "L"}
        await r.wait_display("No free door size L")
        r.world.press("2")
        await r.wait_event("deposit.refused", count=2)
        assert len(r.world.pulses) == 2, "no door was opened for a parcel that does not fit"
        # A small parcel still fits.
        r.world.press("1")
        small = await r.wait_event("door.opened", count=3)
        assert small.compartment == "1"
        r.world.close_door("1")
        await r.wait_event("deposit.aborted")
        assert r.app.controller.compartments["1"].parcel_id is None


async def test_idle_session_ends_by_itself(make_kit: Callable[..., BankKit]) -> None:
    kit = bank(make_kit, [courier_code()], overrides={"deposits": {"session_idle_s": 0.5}})
    async with running(kit) as r:
        r.world.press(COURIER + "#")
        await r.wait_event("session.started")
        ended = await r.wait_event("session.ended")
        assert ended.data["reason"] == "timeout"
        assert ended.data["credential_used"] is False
        assert uses(r, COURIER) == 0, "a session that opened no door used nothing"
        await wait_until(lambda: "Enter code" in r.display(), what="the idle screen")
        assert r.app.controller.session is None


async def test_session_does_not_time_out_while_its_door_is_open(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = bank(make_kit, [drop_code(parcel_id="PX-5")],
               overrides={"deposits": {"session_idle_s": 0.3}})
    async with running(kit) as r:
        r.world.press(DROP + "#")
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
        r.world.press("1")
        await r.wait_event("door.opened")
        await r.wait_event("door.held_open")  # 0.6 s: twice the idle limit
        assert r.events("session.ended") == []
        r.world.set_parcel("1", True)
        r.world.close_door("1")
        await r.wait_event("deposit.confirmed")


async def test_drop_off_code_naming_its_compartment_opens_it_at_once(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = bank(make_kit, [drop_code(compartment="6", parcel_id="PX-6"),
                          drop_code(id="d-2", code="800801", compartment="3",
                                    parcel_id="PX-3")], parcels=["3"])
    async with running(kit) as r:
        r.world.press(DROP + "#")
        opened = await r.wait_event("door.opened")
        assert opened.compartment == "6"
        assert opened.data["parcel_id"] == "PX-6"
        r.world.set_parcel("6", True)
        r.world.close_door("6")
        await r.wait_event("deposit.confirmed")
        # Compartment 3 already holds a parcel: the code naming it is turned down without a
        # pulse, and it stays unused.
        r.world.press("800801#")
        refused = await r.wait_event("deposit.refused")
        assert refused.data["reason"] == "occupied"
        assert r.world.pulses == ["6"]
        assert uses(r, "800801") == 0


async def test_jammed_deposit_door_keeps_the_code_and_offers_another_door(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = bank(make_kit, [drop_code(parcel_id="PX-J")])
    async with running(kit) as r:
        r.world.set_fault("lock:1", "jam", True)
        r.world.press(DROP + "#")
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
        r.world.press("1")
        jam = await r.wait_event("door.jammed")
        assert (jam.compartment, jam.data["code_still_valid"]) == ("1", True)
        assert uses(r, DROP) == 0
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt after the jam")
        r.world.press("1")
        opened = await r.wait_event("door.opened")
        assert opened.compartment == "2", "the jammed door is out of service now"
        assert uses(r, DROP) == 1


async def test_labels_that_cannot_be_parcels_are_refused_and_the_session_goes_on(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = bank(make_kit, [courier_code()])
    async with running(kit) as r:
        # PX-1 lies in compartment 2 from an earlier deposit.
        r.world.press(COURIER + "#")
        await wait_until(lambda: "scan label" in r.display(), what="the label prompt")
        await deposit(r, "PX-1", "1", count=1)
        await r.wait_event("deposit.confirmed")
        await wait_until(lambda: "1 deposited" in r.display(), what="the next-label prompt")
        r.world.scan_label("PX-1")
        refused = await r.wait_event("deposit.refused")
        assert refused.data["reason"] == "parcel_already_here"
        r.world.scan("has space")
        await wait_until(lambda: "Label not readable" in r.display(), what="bad label message")
        r.world.scan(kit.qr_token("pickup", compartment="1"))
        await wait_until(lambda: r.world.display_history[-1].lines[0] == "Label not readable",
                         what="a QR token is not a label")
        assert len(r.world.pulses) == 1
        assert r.app.controller.session is not None
        r.world.press("*")
        await r.wait_event("session.ended")


async def test_daemon_stops_when_asked_right_after_a_key(
    make_kit: Callable[..., BankKit],
) -> None:
    """A stop that arrives in the same loop turn as an input must still stop the daemon (on
    Python 3.11 asyncio.wait_for could swallow that cancellation)."""
    kit = bank(make_kit, [courier_code()])
    for _ in range(5):
        async with running(kit) as r:
            r.world.press(COURIER + "#")
            await r.wait_event("session.started")
            r.world.press("*")
            r.app.request_stop()
            # running() waits at most 10 s for the daemon to end and fails otherwise.
