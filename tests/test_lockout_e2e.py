"""The keypad lockout on the simulator, end to end: only a use consumed for good forgives wrong
codes; a courier or deposit code, a deposit QR token or a pickup closed on its parcel does not.

The bank runs with FAST's `[lockout] free_attempts = 3`: the third wrong code in a row locks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from conftest import Running, running

from lockerd.dev.provision import BankKit, PlainCode

pytestmark = pytest.mark.e2e

PICKUP = "482913"
COURIER = "700700"
DROP = "800800"
CODES = [
    PlainCode("p-1", PICKUP, "3", parcel_id="PX1"),
    PlainCode("c-1", COURIER, None, kind="courier", max_uses=5),
    PlainCode("d-1", DROP, None, kind="deposit", parcel_id="PX-D", max_uses=5),
]


async def wrong(r: Running, n: int) -> None:
    """Type the n-th wrong code of the test and wait until it has been refused."""
    r.world.press(f"99999{n}#")
    await r.wait_event("code.rejected", count=n)


async def session_then_star(r: Running, count: int) -> None:
    await r.wait_event("session.started", count=count)
    r.world.press("*")
    await r.wait_event("session.ended", count=count)


async def courier_code(r: Running, count: int) -> None:
    r.world.press(COURIER + "#")
    await session_then_star(r, count)


async def deposit_code(r: Running, count: int) -> None:
    r.world.press(DROP + "#")
    await session_then_star(r, count)


async def deposit_token(r: Running, count: int) -> None:
    r.world.scan(r.kit.qr_token("deposit", parcel_id=f"PX-Q{count}"))
    await session_then_star(r, count)


async def pickup_left_inside(r: Running, count: int) -> None:
    r.world.press(PICKUP + "#")
    await r.wait_event("pickup.opened", count=count)
    r.world.close_door("3")  # the parcel is still in: the use is given back
    await r.wait_event("pickup.incomplete", count=count)


PRESENTED: dict[str, Callable[[Running, int], Awaitable[None]]] = {
    "courier code": courier_code,
    "deposit code": deposit_code,
    "deposit QR token": deposit_token,
    "pickup left inside": pickup_left_inside,
}


@pytest.mark.parametrize("credential", list(PRESENTED))
async def test_a_credential_presented_again_does_not_lift_the_lockout(
    make_kit: Callable[..., BankKit], credential: str
) -> None:
    present = PRESENTED[credential]
    kit = make_kit(CODES, parcels=["3"])
    async with running(kit) as r:
        # Wrong codes interleaved with a valid credential: without the fix each credential
        # gave the guesser a fresh set of free attempts.
        await wrong(r, 1)
        await present(r, 1)
        await wrong(r, 2)
        await present(r, 2)
        assert r.events("keypad.lockout") == []
        await wrong(r, 3)
        lockout = await r.wait_event("keypad.lockout")
        assert lockout.data["lockouts"] == 1
        await r.wait_display("Too many wrong codes")
        # Locked now: even the valid pickup code, scanned, is refused until the lockout ends.
        r.world.scan(PICKUP)
        refused = await r.wait_event("code.rejected", count=4)
        assert refused.data["reason"] == "locked_out"


async def test_a_completed_pickup_forgives_the_wrong_codes(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(CODES, parcels=["3"])
    async with running(kit) as r:
        await wrong(r, 1)
        await wrong(r, 2)
        r.world.press(PICKUP + "#")
        await r.wait_event("pickup.opened")
        r.world.set_parcel("3", False)
        r.world.close_door("3")
        await r.wait_event("pickup.completed")
        # Two more wrong codes are the first two of a fresh count: no lockout yet.
        await wrong(r, 3)
        await wrong(r, 4)
        assert r.events("keypad.lockout") == []
        await wrong(r, 5)
        await r.wait_event("keypad.lockout")


async def test_a_confirmed_deposit_forgives_the_wrong_codes(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(CODES, compartments=4)
    async with running(kit) as r:
        await wrong(r, 1)
        await wrong(r, 2)
        r.world.press(DROP + "#")
        await r.wait_event("session.started")
        r.world.press("2")  # size M (of S, M, L), the size of every door of this bank
        opened = await r.wait_event("door.opened")
        assert opened.compartment is not None
        r.world.set_parcel(opened.compartment, True)
        r.world.close_door(opened.compartment)
        await r.wait_event("deposit.confirmed")
        await r.wait_event("session.ended")
        await wrong(r, 3)
        await wrong(r, 4)
        assert r.events("keypad.lockout") == []
        await wrong(r, 5)
        await r.wait_event("keypad.lockout")
