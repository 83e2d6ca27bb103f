"""`lockerd demo` as a newcomer uses it: read the printed codes, type one, take the parcel."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from demo_terminal import Terminal
from waiting import until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def test_demo_pickup_with_a_printed_code(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        code = term.expect(r"compartment 1: (\d{6})").group(1)
        term.expect(r"Type 'help'")
        term.type("9999")  # a wrong code first: refused, with the reason on the display
        term.expect(r"\[display\] Code not recognised")
        term.type(code)
        term.expect(r"\[display\] Door 1 is open")
        term.expect(r"event #\d+ pickup.opened door 1 code p-1001")
        term.type("take 1")
        term.type("close 1")
        term.expect(r"event #\d+ pickup.completed door 1 code p-1001")
        term.type("state")
        term.expect(r"display: Thank you!")
        term.type("open 9")
        term.expect(r"simulator: .*9")
        term.type("frobnicate")
        term.expect(r"unknown command 'frobnicate'")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert (tmp_path / "bank" / "lockerd.toml").exists(), "--dir keeps the demo's files"


def test_demo_jam_command_and_the_guided_retry_by_hand(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        code = term.expect(r"compartment 2: (\d{6})").group(1)
        term.expect(r"Type 'help'")
        term.type("jam 2")
        term.expect(r"lock 2 jammed: .*'unjam 2' then '#' within 60 s")
        term.type(code)
        term.expect(r"event #\d+ door\.jammed door 2 code p-1002")
        term.expect(r"\[display\] Door 2 stuck \| Push it, press #")
        term.type("unjam 2")
        term.expect(r"lock 2 works again")
        term.type("#")
        term.expect(r"event #\d+ pickup\.opened door 2 code p-1002")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_demo_ends_cleanly_at_end_of_input(tmp_path: Path) -> None:
    term = Terminal("--dir", str(tmp_path))
    term.expect(r"Type 'help'")
    assert term.proc.stdin is not None
    term.proc.stdin.close()
    term.expect(r"lockerd demo stopped\.")
    assert term.proc.wait(timeout=15) == 0


def _derived(bank: Path, parcel_id: str) -> str:
    """The parcel's pickup code as the backend derives it: from the demo's code key."""
    from lockerd.trust.digest import derived_pickup_code, load_code_key

    return derived_pickup_code(load_code_key(bank / "keys" / "code_key"), "L1", parcel_id, 8)


def test_demo_tour_deposits_then_picks_up_with_the_derived_code(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "demo", "--tour", "--dir",
         str(tmp_path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "FAILED" not in res.stdout

    def index(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"no line matching {pattern!r} in:\n{res.stdout}"
        return found[0]

    courier = re.search(r"Courier code: (\d{6})", res.stdout)
    assert courier is not None
    typed = index(rf"\[tour\] the courier types code {courier.group(1)}#")
    label = index(r"\[tour\] .*scans parcel PX-TOUR-1")
    size_prompt = index(r"\[display\] Parcel PX-TOUR-1 \| Size\? \*=end")
    confirmed = index(r"event #\d+ deposit\.confirmed door (\d+) code c-1 parcel PX-TOUR-1")
    ended = index(r"event #\d+ session\.ended code c-1")
    code = _derived(tmp_path / "bank", "PX-TOUR-1")
    derived = index(rf"\[tour\] the customer types code {code}#")
    completed = index(r"event #\d+ pickup\.completed door \d+ code derived:PX-TOUR-1")
    assert typed < label < size_prompt < confirmed < ended < derived < completed
    # The "no code" chapter: help asked for, the resent code opens the door.
    asked = index(r"\[tour\] chapter 'no code'")
    shown = index(r"\[display\] New code sent by SMS")
    again = index(r"event #\d+ pickup\.completed door 1 code p-1001")
    assert completed < asked < shown < again < index(r"\[tour\] .*End of the tour\.")
    door = re.search(r"deposit\.confirmed door (\d+)", lines[confirmed])
    assert door is not None
    assert f"pickup.completed door {door.group(1)} " in lines[completed]
    # The jam chapter: a door jams, the display asks for the push and `#`, the retry opens it.
    jammed = index(r"event #\d+ door\.jammed door \d+ code p-\d+")
    jam = re.search(r"door\.jammed door (\d+) code (p-\d+)", lines[jammed])
    assert jam is not None
    cid, code_id = jam.groups()
    prompt = index(rf"\[display\] Door {cid} stuck \| Push it, press #")
    pushed = index(r"\[tour\] the customer pushes the door")
    opened = index(rf"event #\d+ pickup\.opened door {cid} code {code_id}\b")
    retried = index(r"\[tour\] pickup completed after the guided retry.*End of the tour\.")
    assert again < prompt < pushed < opened < retried and again < jammed < pushed
    assert lines[-1] == "lockerd demo stopped."


def test_demo_tour_on_a_full_bank_fails_readably(tmp_path: Path) -> None:
    # Three compartments, three parcels: nowhere to deposit. A message, not a traceback.
    res = subprocess.run(
        [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "demo", "--tour", "--compartments",
         "3", "--dir", str(tmp_path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert re.search(r"\[tour\] FAILED: .*no_free_compartment", res.stdout), res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "lockerd demo stopped."


def test_demo_courier_commands_label_derive_and_qr(tmp_path: Path) -> None:
    term = Terminal("--dir", str(tmp_path))
    try:
        courier = term.expect(r"Courier code: (\d{6})\s+\(code id c-1\)").group(1)
        term.expect(r"Type 'help'")
        term.type(courier)
        term.expect(r"\[display\] Courier: scan label")
        term.type("label PX9")
        term.expect(r"\[display\] Parcel PX9 \| Size\? \*=end \| 1=S 2=M 3=L")
        term.type("1")  # size S: 1 and 2 hold parcels, so the smallest free one larger: 4 (M)
        term.expect(r"event #\d+ door\.opened door 4 code c-1")
        term.type("put 4")
        term.type("close 4")
        term.expect(r"event #\d+ deposit\.confirmed door 4 code c-1 parcel PX9")
        term.type("label PX8")  # the session goes on: a second parcel
        term.expect(r"\[display\] Parcel PX8 \| Size\?")
        term.type("2")
        term.expect(r"event #\d+ door\.opened door 5 code c-1")
        term.type("put 5")
        term.type("close 5")
        term.expect(r"event #\d+ deposit\.confirmed door 5 code c-1 parcel PX8")
        term.type("*")
        term.expect(r"event #\d+ session\.ended code c-1")
        term.type("state")
        term.expect(r"^\s+4\s+M\s+locked\s+closed\s+yes\s+in\s+PX9$")
        term.expect(r"^\s+6\s+L\s+locked\s+closed\s+no\s+in\s+-$")

        term.type("derive PX9")
        code = term.expect(r"^derived pickup code of parcel PX9: (\d{8})\s").group(1)
        assert code == _derived(tmp_path / "bank", "PX9")
        term.type(code)
        term.expect(r"event #\d+ pickup\.opened door 4 code derived:PX9 parcel PX9")

        term.type("qr pickup-parcel PX8")
        cti = term.expect(r"scanning a signed QR token: LK1:.*\(\d+ characters, token id "
                          r"([0-9a-f]{32})\)").group(1)
        # The events name the token, what it is for and, refused, why.
        term.expect(rf"event #\d+ pickup\.opened door 5 token {cti} \(pickup QR token for "
                    r"parcel PX8\)$")
        term.type("qr pickup 1")
        term.expect(r"scanning a signed QR token: LK1:")
        term.expect(r"event #\d+ pickup\.opened door 1 token [0-9a-f]{32} \(pickup QR token "
                    r"for door 1\)$")
        term.type("qr pickup 1")  # door 1 is open now: refused, and the reason is shown
        term.expect(r"event #\d+ code\.rejected door 1 token [0-9a-f]{32} \(pickup QR token "
                    r"for door 1\) reason \w+$")

        # Bad arguments: a readable line each, and the demo goes on.
        term.type("qr pickup 99")
        term.expect(r"no compartment '99' in this bank \(1-8\)")
        term.type("qr")
        term.expect(r"usage: qr pickup N \| qr pickup-parcel PARCEL")
        term.type("derive")
        term.expect(r"usage: derive PARCEL")
        term.type("label")
        term.expect(r"usage: label PARCEL")
        term.type("label PX 1")
        term.expect(r"simulator: bad parcel id")
        term.type("codes")
        term.expect(rf"Courier code: {courier}")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_demo_tour_command_and_the_demo_goes_on(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        term.expect(r"Type 'help'")
        term.type("tour")
        term.expect(r"event #\d+ deposit\.confirmed door 4 code c-1 parcel PX-TOUR-1")
        term.expect(r"event #\d+ pickup\.completed door 4 code derived:PX-TOUR-1")
        term.expect(r"\[tour\] pickup completed with code derived:PX-TOUR-1")
        term.expect(r"event #\d+ help.answered")
        term.expect(r"event #\d+ pickup\.completed door 1 code p-1001")
        term.expect(r"\[tour\] .*End of the tour\.")
        term.type("tour")  # again: the parcel id is free again, so the same one
        # The first tour's chapters emptied door 1, the smallest: it is chosen now.
        term.expect(r"event #\d+ pickup\.completed door 1 code derived:PX-TOUR-1")
        term.expect(r"\[tour\] pickup completed")
        term.type("state")
        term.expect(r"^\s+4\s+L\s+locked\s+closed\s+no\s+in\s+-$")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


async def test_shipped_sim_config_has_a_courier_code_and_derived_pickups(tmp_path: Path) -> None:
    """config/sim.toml with its re-signed bundle: the three pickup codes as before, the courier
    code 444444, and the pickup of a deposited parcel with its derived code."""
    import asyncio
    import shutil

    from lockerd.app import build_app
    from lockerd.config import load_config
    from sim.backend import world_of

    shutil.copy(REPO / "config" / "sim.toml", tmp_path / "sim.toml")
    shutil.copytree(REPO / "config" / "sim", tmp_path / "sim",
                    ignore=shutil.ignore_patterns("state", "sim.sock"))
    config = load_config(tmp_path / "sim.toml")
    assert config.codes.derived_pickup

    app = build_app(config)
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        assert app.codes.version() == 2
        world = world_of(app.hal)

        def seen(type_: str) -> list[str | None]:
            return [e.compartment for e in app.events.recent(1000) if e.type == type_]

        world.press("444444#")
        await until(lambda: bool(seen("session.started")), what="session.started")
        world.scan_label("PX200")
        await until(lambda: "Size?" in world.state()["display"], what="the size prompt")
        world.press("1")
        await until(lambda: bool(seen("door.opened")), what="door.opened")
        cid = seen("door.opened")[0]
        assert cid == "4"  # S is full (1 and 2 hold parcels): the smallest free larger one
        world.set_parcel(cid, True)
        world.close_door(cid)
        await until(lambda: bool(seen("deposit.confirmed")), what="deposit.confirmed")
        world.press("*")
        await until(lambda: bool(seen("session.ended")), what="session.ended")
        await until(lambda: world.compartment(cid).locked, what="the latch of door 4")
        world.press(_derived(tmp_path / "sim", "PX200") + "#")
        await until(lambda: seen("pickup.opened") == [cid], what="pickup.opened")
        world.press("111111#")  # the pickup codes of before still work
        await until(lambda: seen("pickup.opened") == [cid, "1"], what="pickup.opened of door 1")
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 10)


def test_demo_help_a_customer_without_a_code_gets_an_answer(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        term.expect(r"Type 'help'")
        term.type("help")
        term.expect(r"help TRACKING PHONE4")
        term.type("help PX-NOT-HERE 9876")
        term.expect(r"\[display\] Tracking number\?")
        term.expect(r"\[display\] Checking\.\.\. \| Ref H-[A-Z0-9]{6}")
        term.expect(r"event #\d+ help.requested")
        term.expect(r"\[backend\] help request H-[A-Z0-9]{6} for PX-NOT-HERE: not_found")
        term.expect(r"event #\d+ help.answered")
        term.expect(r"\[display\] No parcel found")
        term.type("help PX 12")
        term.expect(r"usage: help TRACKING PHONE4")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
