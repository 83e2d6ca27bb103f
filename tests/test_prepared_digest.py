"""The digest of the code being typed, made between two keys: the controller prepares the
digits typed so far, and `#` uses that digest only for exactly those digits. Through the
executor, a real SQLite database with bundle codes, the simulator's lock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from conftest import wait_until
from test_controller import controller_running
from test_support_codes import WINDOW_START, make_rig, pickup_code

from hal.base import KeyPressed
from lockerd.core.access import Reason, Refused
from lockerd.core.bank import OpenPickup
from lockerd.trust.bundle import CodeEntry as BundleCode
from lockerd.trust.digest import code_digest

pytestmark = pytest.mark.unit

LOCKER, CODE_KEY = "L1", bytes(range(32))


def test_a_prepared_digest_is_the_digest_of_its_code(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, support=False)
    rig.apply(codes=(pickup_code("p-1", "11112222", "PX1", "2"),))
    creds, views = rig.credentials, rig.ctl.bank.views()
    now = rig.clock.wall()
    assert creds.prepared is None
    # Prepared for another code: the code submitted is the one looked up, both ways round.
    creds.prepare("11112222")
    wrong = creds.code("11112223", source="keypad", views=views, now=now, derived_digits=None)
    assert isinstance(wrong, Refused) and wrong.reason is Reason.UNKNOWN
    creds.prepare("11112223")
    right = creds.code("11112222", source="keypad", views=views, now=now, derived_digits=None)
    assert isinstance(right, OpenPickup) and right.compartment == "2"
    # Prepared for the code itself: the same decision, and the digits are forgotten.
    creds.prepare("11112222")
    assert creds.prepared == "11112222"
    again = creds.code("11112222", source="keypad", views=views, now=now, derived_digits=None)
    assert again == right
    assert creds.prepared is None
    rig.db.close()


async def test_keys_typed_one_by_one_prepare_the_digits_so_far(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, support=False)
    rig.apply(codes=(pickup_code("p-1", "11112222", "PX1", "2"),))
    await rig.press("999")
    assert rig.credentials.prepared == "999"
    # Left half-typed past the entry timeout: the tick that times it out forgets it.
    rig.clock.t += 11.0
    await rig.ctl.step(None)
    assert rig.ctl.bank.code_being_typed() is None and rig.credentials.prepared is None
    await rig.press("999")
    assert rig.credentials.prepared == "999"
    # '*' clears the entry; the digits typed next are prepared afresh, and their '#' opens.
    await rig.press("*1111222")
    assert rig.credentials.prepared == "1111222"
    await rig.press("2#")
    await rig.ctl.wait_pulses()
    assert rig.world.pulses == ["2"]
    assert rig.last("lock.pulse").code_id == "p-1"
    rig.db.close()


async def test_a_code_typed_after_a_prepared_wrong_one_is_still_looked_up(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, support=False)
    rig.apply(codes=(pickup_code("p-1", "11112222", "PX1", "2"),))
    # A wrong code, typed key by key: prepared, submitted, refused.
    await rig.press("11112223")
    assert rig.credentials.prepared == "11112223"
    await rig.press("#")
    assert rig.world.pulses == [] and "code.rejected" in rig.types()
    assert rig.credentials.prepared is None  # used by its '#', then forgotten
    # The right code in one burst (nothing is prepared between its keys): it opens.
    try:
        async with controller_running(rig.ctl):
            for key in "11112222#":
                rig.ctl.emit(KeyPressed(key))
            await wait_until(lambda: rig.world.pulses == ["2"], what="the pulse")
            assert rig.credentials.prepared is None
            assert rig.last("lock.pulse").code_id == "p-1"
    finally:
        rig.db.close()


async def test_nothing_is_prepared_while_a_deposit_session_or_help_holds_the_keypad(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, support=False)
    courier = BundleCode(id="c-1", kind="courier", digest=code_digest(CODE_KEY, LOCKER, "777000"),
                         not_after=WINDOW_START + timedelta(days=2), compartment=None,
                         parcel_id=None, max_uses=5)
    rig.apply(codes=(courier,))
    bank = rig.ctl.bank
    await rig.press("12")
    assert bank.code_being_typed() == "12"
    assert rig.credentials.prepared == "12"
    await rig.press("*")
    # Cleared: nothing typed, nothing kept.
    assert bank.code_being_typed() is None and rig.credentials.prepared is None
    # '#' with nothing typed starts help: the digits typed in it are no code.
    await rig.press("#")
    assert bank.help is not None
    await rig.press("34")
    assert bank.code_being_typed() is None and rig.credentials.prepared is None
    await rig.press("*")  # '*' ends help
    assert bank.help is None
    # A courier's code starts a deposit session: its keys choose sizes, they are no code.
    await rig.press("777000#")
    assert bank.session is not None
    await rig.press("1")
    assert bank.code_being_typed() is None and rig.credentials.prepared is None
    rig.db.close()
