"""Signed QR tokens scanned on the simulator: accepted once, refused with a reason otherwise."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta

import base45  # type: ignore[import-untyped]  # no type hints shipped
import pytest
from conftest import Running, running, wait_until

from lockerd.dev.provision import BankKit
from lockerd.store import open_database
from lockerd.store.parcels import SpentTokens
from lockerd.timeutil import utcnow
from lockerd.trust.qrtoken import MAX_QR_CHARS, QR_PREFIX

pytestmark = pytest.mark.e2e


def alter_one_byte(token: str, position: int) -> str:
    raw = bytearray(base45.b45decode(token.removeprefix(QR_PREFIX)))
    raw[position % len(raw)] ^= 0x01
    encoded: bytes = base45.b45encode(bytes(raw))
    return QR_PREFIX + encoded.decode("ascii")


async def scan_refused(r: Running, data: str, *, count: int) -> dict[str, object]:
    r.world.scan(data)
    ev = await r.wait_event("code.rejected", count=count)
    assert ev.data["source"] == "scanner"
    return dict(ev.data)


async def test_pickup_token_opens_its_compartment_once_even_across_a_restart(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(parcels=["4"])
    cti = secrets.token_bytes(12)
    token = kit.qr_token("pickup", compartment="4", cti=cti)
    async with running(kit) as r:
        r.world.scan(token)
        opened = await r.wait_event("pickup.opened")
        assert opened.compartment == "4"
        assert opened.code_id is None
        assert opened.data["cti"] == cti.hex()
        assert SpentTokens(r.app.db).is_spent(cti.hex())
        r.world.set_parcel("4", False)
        r.world.close_door("4")
        done = await r.wait_event("pickup.completed")
        assert done.data["cti"] == cti.hex()
        # Replayed at once: refused, no pulse.
        data = await scan_refused(r, token, count=1)
        assert data["reason"] == "used"
        assert data["cti"] == cti.hex()
        await r.wait_display("already used")
        assert r.world.pulses == ["4"]
    async with running(kit) as r2:
        r2.world.set_parcel("4", True)  # a new parcel in the same door
        data = await scan_refused(r2, token, count=2)
        assert data["reason"] == "used", "the cti stays spent across a restart"
        assert r2.world.pulses == []


async def test_pickup_token_closed_on_its_parcel_can_be_scanned_again(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(parcels=["2"])
    token = kit.qr_token("pickup", compartment="2")
    async with running(kit) as r:
        r.world.scan(token)
        await r.wait_event("pickup.opened")
        r.world.close_door("2")  # parcel still inside
        await r.wait_event("pickup.incomplete")
        r.world.scan(token)
        await r.wait_event("pickup.opened", count=2)


async def test_pickup_token_by_parcel_id_opens_the_door_holding_that_parcel(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(compartments=3, sizes=["S", "M", "L"])
    async with running(kit) as r:
        # Deposit PX-77 with a drop-off token that names its parcel; then collect it with a
        # pickup token that names only the parcel.
        r.world.scan(kit.qr_token("deposit", parcel_id="PX-77"))
        await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
        r.world.press("2")
        opened = await r.wait_event("door.opened")
        assert opened.compartment == "2"
        assert "cti" in opened.data
        r.world.set_parcel("2", True)
        r.world.close_door("2")
        confirmed = await r.wait_event("deposit.confirmed")
        assert confirmed.data["parcel_id"] == "PX-77"
        await r.wait_event("session.ended")
        await wait_until(lambda: r.app.controller.session is None, what="the session to end")
        r.world.scan(kit.qr_token("pickup", parcel_id="PX-77"))
        pickup = await r.wait_event("pickup.opened")
        assert (pickup.compartment, pickup.data["parcel_id"]) == ("2", "PX-77")


def _cases(kit: BankKit) -> list[tuple[str, str, str]]:
    now = utcnow()
    good = kit.qr_token("pickup", compartment="1")
    return [
        ("expired", kit.qr_token("pickup", compartment="1",
                                 expires_at=now - timedelta(minutes=1)), "expired"),
        ("not yet valid", kit.qr_token("pickup", compartment="1",
                                       not_before=now + timedelta(hours=1),
                                       expires_at=now + timedelta(hours=2)), "not_yet_valid"),
        ("another locker", kit.qr_token("pickup", compartment="1", locker_id="L2"),
         "wrong_locker"),
        ("codes key", kit.qr_token("pickup", compartment="1", signer=kit.codes_key),
         "unknown_key"),
        ("one byte altered", alter_one_byte(good, -10), "signature"),
        # Cut on a base45 group boundary: the text decodes, the COSE structure is cut short.
        ("truncated", good[: len(QR_PREFIX) + 3 * ((len(good) - len(QR_PREFIX)) // 6)],
         "malformed"),
        ("not base45", QR_PREFIX + "abc!!", "not_base45"),
        ("huge", QR_PREFIX + "A" * MAX_QR_CHARS, "too_large"),
    ]


@pytest.mark.parametrize("index", range(8))
async def test_bad_tokens_are_refused_with_their_reason(
    make_kit: Callable[..., BankKit], index: int,
) -> None:
    kit = make_kit(parcels=["1"])
    name, token, reason = _cases(kit)[index]
    async with running(kit) as r:
        data = await scan_refused(r, token, count=1)
        assert data["reason"] == reason, name
        assert r.world.pulses == [], name
        signed = reason in ("expired", "not_yet_valid", "wrong_locker")
        assert ("cti" in data) is signed, (name, data)
        # The display says why, in words a customer can act on.
        idle = "Enter code, press #\nNo code? Press #\nor scan QR code"
        assert r.display() not in ("", idle), name
        # The daemon is still up: a valid token right after works.
        r.world.scan(kit.qr_token("pickup", compartment="1"))
        await r.wait_event("pickup.opened")


async def test_refusal_texts_name_the_reason(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit(parcels=["1"])
    expected = {"expired": "expired", "wrong_locker": "another locker",
                "unknown_key": "Unknown issuer", "signature": "Signature",
                "not_base45": "damaged", "too_large": "too large",
                "not_yet_valid": "not valid yet", "malformed": "not valid"}
    async with running(kit) as r:
        for count, (name, token, reason) in enumerate(_cases(kit), start=1):
            r.world.scan(token)
            await r.wait_event("code.rejected", count=count)
            await r.wait_display(expected[reason], case=name)


async def test_courier_token_starts_a_session_and_is_spent_by_its_first_door(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(compartments=2, sizes=["M", "M"], overrides={"deposits": {"sizes": ["M"]}})
    cti = secrets.token_bytes(8)
    token = kit.qr_token("courier", cti=cti)
    async with running(kit) as r:
        r.world.scan(token)
        started = await r.wait_event("session.started")
        assert started.data["cti"] == cti.hex()
        r.world.scan_label("PX-A")  # one size: no size prompt, the door opens
        await r.wait_event("door.opened")
        assert SpentTokens(r.app.db).is_spent(cti.hex())
        r.world.set_parcel("1", True)
        r.world.close_door("1")
        await r.wait_event("deposit.confirmed")
        r.world.press("*")
        await r.wait_event("session.ended")
        await wait_until(lambda: r.app.controller.session is None, what="the session to end")
        data = await scan_refused(r, token, count=1)
        assert data["reason"] == "used"


async def test_token_expiry_follows_the_trusted_time_floor(
    make_kit: Callable[..., BankKit],
) -> None:
    """With an unsynchronised clock the signed time floor decides: a token that the system
    clock still finds valid is expired once the floor has passed its exp (safety rule 7)."""
    kit = make_kit(parcels=["1"], overrides={"time": {"trust_system_clock": "never"}})
    token = kit.qr_token("pickup", compartment="1", expires_at=utcnow() + timedelta(hours=1))
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        db.set_meta("time_floor", (utcnow() + timedelta(hours=2)).timestamp())
    finally:
        db.close()
    async with running(kit) as r:
        data = await scan_refused(r, token, count=1)
        assert data["reason"] == "expired"
        assert r.world.pulses == []


async def test_digits_typed_before_a_courier_scan_do_not_time_out_over_the_session(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit(overrides={"entry": {"timeout_s": 0.3},
                              "deposits": {"session_idle_s": 0.8}})
    async with running(kit) as r:
        r.world.press("12")
        await wait_until(lambda: r.display().startswith("Code: **"), what="the typed digits")
        r.world.scan(kit.qr_token("courier"))
        await r.wait_event("session.started")
        shown_before = len(r.world.display_history)
        # The half-typed code's timeout (0.3 s) falls inside the session (0.8 s).
        await r.wait_event("session.ended")
        later = [m.lines[0] for m in r.world.display_history[shown_before:]]
        assert "Entry timed out" not in later, later
