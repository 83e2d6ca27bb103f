"""lockerctl's help tools against the suite's Mosquitto and a running bank: the reference
responder answers from a CSV file, a reply signed by `help-reply` is published and shown,
and `lockerctl events` describes help requests in words."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from conftest import Running, running, wait_until
from test_help_e2e import ask_help, connected
from test_sync_mqtt import mqtt_overrides

from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import BankKit

pytestmark = pytest.mark.e2e

CSV = "tracking,phone_last4,message\n12345,9876,New code sent by SMS to ***76\n"


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    overrides: dict[str, Any] = mqtt_overrides(broker)
    overrides["help"] = {"reply_timeout_s": 60}
    return make_kit([], overrides=overrides)


class Err:
    """What lockerctl has written to stderr so far (capsys hands each piece out once)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.text = ""
        self.out = ""

    def __call__(self) -> str:
        got = self._capsys.readouterr()
        self.text += got.err
        self.out += got.out
        return self.text


async def _ask(r: Running, tracking: str, phone: str, count: int) -> dict[str, Any]:
    r.world.press("#")
    await wait_until(lambda: "Tracking number?" in r.display(), what="tracking prompt")
    r.world.scan(tracking)
    # The scanner and the keypad are two devices: the phone digits wait for their prompt.
    await wait_until(lambda: "Phone, last 4?" in r.display(), what="phone prompt")
    r.world.press(phone)
    return dict((await r.wait_event("help.requested", count=count)).data)


async def test_the_reference_responder_answers_from_its_csv(
        kit: BankKit, broker: Broker, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    codes = tmp_path / "codes.csv"
    codes.write_text(CSV)
    err = Err(capsys)
    async with running(kit) as r:
        await connected(r)
        responder = asyncio.create_task(asyncio.to_thread(lockerctl, [
            "respond-help", "--broker", broker.address, "--locker", "L1", "--codes-file",
            str(codes), "--sign", str(kit.directory / "keys" / "root.key"), "--count", "2",
            "--wait", "30"]))
        await wait_until(lambda: "answering help requests" in err(), what="responder up")
        first = await _ask(r, "12345", "9876", 1)
        await wait_until(lambda: "New code sent by SMS" in r.display(), what="resent shown")
        await r.wait_event("help.answered")
        r.world.press("*")  # back to idle at once
        second = await _ask(r, "JJD-UNKNOWN-1", "1111", 2)
        await wait_until(lambda: "No parcel found" in r.display(), what="not_found shown")
        assert await asyncio.wait_for(responder, 30) == 0
        outcomes = {e.data["help_id"]: e.data["outcome"] for e in r.events("help.answered")}
        assert outcomes == {first["help_id"]: "resent", second["help_id"]: "not_found"}
        assert r.world.pulses == []
    err()
    assert f"H-{first['reference']} tracking 12345: resent" in err.out


async def test_help_reply_signs_what_publish_sends_and_events_describes(
        kit: BankKit, broker: Broker, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    err = Err(capsys)
    async with running(kit) as r:
        await connected(r)
        data = await ask_help(r)
        reply = tmp_path / "reply.json"
        assert await asyncio.to_thread(lockerctl, [
            "help-reply", "--locker", "L1", "--help-id", data["help_id"], "--outcome",
            "support", "--message", "Please call 0800 123 456", "--expires-in", "10m",
            "--sign", str(kit.directory / "keys" / "root.key"), "-o", str(reply)]) == 0
        assert await asyncio.to_thread(lockerctl, [
            "publish", "--broker", broker.address, "--locker", "L1", str(reply)]) == 0
        await wait_until(lambda: "Please call 0800" in r.display(), what="reply shown")
        assert (await r.wait_event("help.answered")).data["outcome"] == "support"
        # With --state it asks the bank to resend from seq 1: every event so far comes.
        assert await asyncio.to_thread(lockerctl, [
            "events", "--broker", broker.address, "--locker", "L1", "--state",
            str(tmp_path / "L1.state"), "--count", str(r.app.events.last_seq()),
            "--wait", "20"]) == 0
        err()
    assert (f"help requested H-{data['reference']}" in err.text
            and "tracking 12345, phone ending 9876" in err.text)
    assert "published help reply" in err.out
    # stdout stays one JSON event a line.
    assert all(json.loads(line) for line in err.out.splitlines() if line.startswith("{"))


@pytest.mark.parametrize(("row", "says"), [
    ("12345,98x6,hello", "line 2: phone_last4 must be 4 digits"),
    ("12345,9876", "line 2: expected tracking,phone_last4,message"),
    ("12345,9876," + "x" * 81, "line 2: message must be 1-80"),
])
def test_a_bad_codes_file_is_refused_naming_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], row: str, says: str) -> None:
    codes = tmp_path / "codes.csv"
    codes.write_text(f"tracking,phone_last4,message\n{row}\n")
    key = tmp_path / "k.key"
    assert lockerctl(["keygen", str(key)]) == 0
    status = lockerctl(["respond-help", "--broker", "127.0.0.1:1", "--locker", "L1",
                        "--codes-file", str(codes), "--sign", str(key)])
    err = capsys.readouterr().err
    assert status != 0 and says in err and "Traceback" not in err
