"""lockerctl's broker commands against a real Mosquitto: publish, events with acks, state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker

from lockerd.cli.lockerctl_broker import AckTracker
from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import make_bank

pytestmark = pytest.mark.e2e


def test_ack_tracker_acknowledges_only_in_order() -> None:
    t = AckTracker()
    assert [t.seen(s) for s in (5, 6, 8, 7, 6, 8)] == [True, True, False, True, False, True]
    assert t.upto == 8


async def test_events_are_printed_and_acknowledged(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as bank:
        await bank.subscribe("lockers/L1/events/ack", qos=1)
        cli = asyncio.create_task(asyncio.to_thread(lockerctl, [
            "events", "--broker", broker.address, "--locker", "L1", "--ack", "--count", "3",
            "--wait", "20"]))
        await asyncio.sleep(0.5)  # let lockerctl subscribe; QoS 1 events are not retained
        for seq in (1, 2, 3):
            event = {"seq": seq, "event_id": f"e{seq}", "type": "door.opened",
                     "at": "2026-11-29T03:00:00Z", "locker_id": "L1", "compartment": "1",
                     "code_id": None, "data": {}}
            await bank.publish("lockers/L1/events", json.dumps(event), qos=1)
        assert await asyncio.wait_for(cli, 30) == 0
        acks = []
        async with asyncio.timeout(10):
            async for message in bank.messages:
                acks.append(json.loads(message.payload))  # type: ignore[arg-type]
                if acks[-1]["upto_seq"] == 3:
                    break
    assert acks == [{"upto_seq": 1}, {"upto_seq": 2}, {"upto_seq": 3}]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in printed] == [1, 2, 3]


async def test_publish_picks_topic_and_retain_from_the_envelope(broker: Broker,
                                                                bank_dir: Path) -> None:
    kit = make_bank(bank_dir / "bank")
    delta = bank_dir / "delta.json"
    delta.write_bytes(kit.bundle([], version=2, base_version=1))
    for path in (kit.keyring_path, kit.bundle_path, delta):
        status = await asyncio.to_thread(lockerctl, [
            "publish", "--broker", broker.address, "--locker", "L1", str(path)])
        assert status == 0
    # A late subscriber sees the retained keyring and snapshot, not the delta.
    got: dict[str, bytes] = {}
    async with aiomqtt.Client(broker.host, broker.port) as late:
        await late.subscribe("lockers/L1/#", qos=1)
        async with asyncio.timeout(5):
            async for message in late.messages:
                got[str(message.topic)] = message.payload  # type: ignore[assignment]
                if len(got) == 2:
                    break
    assert got == {"lockers/L1/keyring": kit.keyring_path.read_bytes(),
                   "lockers/L1/codes": kit.bundle_path.read_bytes()}


def test_publish_refuses_what_it_cannot_place(bank_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    junk = bank_dir / "junk.json"
    junk.write_text('{"payloadType": "text/plain", "payload": "", "signatures": []}')
    status = lockerctl(["publish", "--broker", "127.0.0.1:1", "--locker", "L1", str(junk)])
    assert status == 1
    assert "is not published by lockerctl" in capsys.readouterr().err
    status = lockerctl(["publish", "--broker", "127.0.0.1:notaport", "--locker", "L1",
                        str(junk)])
    assert status == 2
    assert "the port must be a number" in capsys.readouterr().err


def test_unreachable_broker_is_one_clear_line(bank_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    kit = make_bank(bank_dir / "bank")
    from broker import free_port

    status = lockerctl(["publish", "--broker", f"127.0.0.1:{free_port()}", "--locker", "L1",
                        "--timeout", "2", str(kit.keyring_path)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("lockerctl: error: broker 127.0.0.1:") and "Traceback" not in err
