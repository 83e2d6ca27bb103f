"""Support codes end to end: lockerctl prints the code support reads out, and the daemon on the
simulated bank opens the parcel's door with it, once (PROTOCOL section 13)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import RunFn, running
from demo_terminal import Terminal
from test_derived_e2e import courier, courier_deposit

from hal.values import KeyPressed, OccupancyChanged
from lockerd.app import build_app
from lockerd.config import load_config
from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store import open_database
from lockerd.store.codes import CodeStore
from lockerd.timeutil import utcnow
from lockerd.trust.digest import load_code_key, support_code, support_window

pytestmark = pytest.mark.e2e

PICKUP = "31415926"
SUPPORT_ON = {"codes": {"support_codes": True}}


def pickup() -> PlainCode:
    return PlainCode("p-200", PICKUP, "3", parcel_id="PX200", max_uses=2)


def read_out(kit: BankKit, parcel_id: str, *extra: str) -> str:
    """The code as support gets it: with lockerctl, from the parcel id and the time."""
    out = subprocess.run(
        [sys.executable, "-m", "lockerd.cli.lockerctl_cmd", "support-code",
         "--code-key", str(kit.directory / "keys" / "code_key"), "--locker", kit.locker_id,
         "--parcel", parcel_id, *extra],
        capture_output=True, text=True, check=True)
    assert "valid once, until" in out.stderr
    return out.stdout.strip()


async def test_a_support_code_opens_the_parcels_door_once_and_takes_its_codes_use(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([pickup()], compartments=4, parcels=["3"], overrides=SUPPORT_ON)
    code = read_out(kit, "PX200")
    assert len(code) == 8 and code.isdigit()
    async with running(kit) as r:
        r.world.press(code + "#")
        opened = await r.wait_event("pickup.opened")
        assert (opened.compartment, opened.code_id) == ("3", "p-200")
        assert opened.data["via"] == "support"
        r.world.set_parcel("3", False)
        r.world.close_door("3")
        done = await r.wait_event("pickup.completed")
        assert done.data["via"] == "support"
        # The parcel's own code gave one of its two uses to it.
        record = r.app.codes.lookup(kit.digest(PICKUP))
        assert record is not None and record.uses == 1
    async with running(kit) as r:
        # Its code still has a use left, but the support code was used: kept across a restart.
        r.world.press(code + "#")
        refused = await r.wait_event("code.rejected")
        assert (refused.data["reason"], refused.code_id) == ("used", "p-200")
        assert r.world.pulses == []


async def test_a_pickup_left_incomplete_gives_it_back_and_revocation_disables_it(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([courier()], compartments=4, overrides=SUPPORT_ON)
    async with running(kit) as r:
        cid = await courier_deposit(r, "PX-S")
        kept = await courier_deposit(r, "PX-KEEP", count=2)
        code = read_out(kit, "PX-S")
        r.world.press(code + "#")
        await r.wait_event("pickup.opened")
        r.world.close_door(cid)  # the customer leaves the parcel: the code is given back
        incomplete = await r.wait_event("pickup.incomplete")
        assert incomplete.data["via"] == "support"
        r.world.press(code + "#")
        await r.wait_event("pickup.opened", count=2)
        assert r.app.codes.support_used("PX-S", int(incomplete.data["window"]))
        r.world.close_door(cid)
        await r.wait_event("pickup.incomplete", count=2)
        pulses = len(r.world.pulses)
        r.app.cache.load_bundle(kit.bundle([courier()], version=2, base_version=1,
                                           revoke=["derived:PX-S"]), source="test")
        r.world.press(code + "#")
        ev = await r.wait_event("code.rejected")
        assert (ev.data["reason"], ev.code_id, ev.data["via"]) == (
            "revoked", "derived:PX-S", "support")
        assert len(r.world.pulses) == pulses
        # Another parcel's support code is untouched.
        r.world.press(read_out(kit, "PX-KEEP") + "#")
        opened = await r.wait_event("pickup.opened", count=3)
        assert (opened.compartment, opened.data["via"]) == (kept, "support")


class StillClock:
    """A wall time that stands still, and a monotonic one to match."""

    def __init__(self, wall: datetime) -> None:
        self._wall = wall

    def monotonic(self) -> float:
        return 1000.0

    def wall(self) -> datetime:
        return self._wall


async def test_old_support_marks_are_pruned_at_start_and_recent_ones_still_refuse(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([pickup()], compartments=4, parcels=["3"], overrides=SUPPORT_ON)
    now = utcnow()
    w = support_window(now.timestamp())
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        with db.transaction() as conn:
            for parcel_id, window in [("PX200", w - 1), ("PX200", w - 2), ("PX200", w - 3),
                                      ("PX-GONE", w - 500), ("PX-NEW", w)]:
                CodeStore(db).change_support_use(conn, parcel_id, window, +1)
    finally:
        db.close()
    app = build_app(load_config(kit.config_path), clock=StillClock(now))
    try:
        await app.load_bundle_file()
        rows = app.db.conn.execute(
            "SELECT parcel_id, window FROM support_uses ORDER BY window").fetchall()
        # Two windows back and later are kept; older marks can never be matched again.
        assert [tuple(row) for row in rows] == [("PX200", w - 2), ("PX200", w - 1),
                                                ("PX-NEW", w)]
        # A kept mark still refuses its code, and the door stays shut.
        await app.controller.step(OccupancyChanged("3", True))
        code = support_code(load_code_key(kit.directory / "keys" / "code_key"),
                            kit.locker_id, "PX200", w - 1)
        for key in code + "#":
            await app.controller.step(KeyPressed(key))
        refused = [e for e in app.events.recent(100) if e.type == "code.rejected"]
        assert [(e.data["reason"], e.data["via"]) for e in refused] == [("used", "support")]
        assert [e for e in app.events.recent(100) if e.type == "pickup.opened"] == []
    finally:
        app.db.close()


async def test_support_codes_are_refused_unless_enabled(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([pickup()], compartments=4, parcels=["3"])
    async with running(kit) as r:
        r.world.press(read_out(kit, "PX200") + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "unknown_code"
        assert r.events("pickup.opened") == []


def test_lockerctl_support_code(run: RunFn, tmp_path: Path) -> None:
    key_path = tmp_path / "L1.codekey"
    assert run("code-key", key_path).status == 0
    key = load_code_key(key_path)
    result = run("support-code", "--code-key", key_path, "--locker", "L1", "--parcel", "PX200",
                 "--at", "2026-12-01T10:05:00Z")
    assert result.status == 0, result.err
    window = int(datetime(2026, 12, 1, 10, 5, tzinfo=UTC).timestamp()) // 600
    assert result.out.strip() == support_code(key, "L1", "PX200", window, 8)
    assert "until 2026-12-01T10:20:00Z" in result.err
    result = run("support-code", "--code-key", key_path, "--locker", "L1", "--parcel", "PX200",
                 "--at", "2026-12-01T10:05:00Z", "--digits", "6")
    assert result.out.strip() == support_code(key, "L1", "PX200", window, 6)
    for bad in (["--digits", "3"], ["--at", "yesterday"], ["--locker", "bad id"]):
        result = run("support-code", "--code-key", key_path, "--locker", "L1",
                     "--parcel", "PX200", *bad)
        assert result.status == 2
        assert "Traceback" not in result.err
        assert bad[0] in result.err
    result = run("support-code", "--code-key", key_path, "--locker", "L1", "--parcel", "")
    assert result.status == 2 and "--parcel" in result.err


def test_demo_support_prints_the_code_that_opens_the_parcels_door(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        term.expect(r"Type 'help'")
        term.type("support PX101")
        code = term.expect(r"^support code of parcel PX101: (\d{8})\s").group(1)
        key = load_code_key(tmp_path / "bank" / "keys" / "code_key")
        windows = {int(time.time()) // 600 + d for d in (-1, 0, 1)}
        assert code in {support_code(key, "L1", "PX101", w, 8) for w in windows}
        term.type(code)
        term.expect(r"event #\d+ pickup\.opened door 1 code p-1001")
        term.type("support")
        term.expect(r"usage: support PARCEL")
        term.type("support PX 1")
        term.expect(r"usage: support PARCEL")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
