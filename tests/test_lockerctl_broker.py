"""lockerctl's broker commands against a real Mosquitto: publish, events with acks, state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker

from lockerd.cli.lockerctl_broker import AckTracker
from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import make_bank

pytestmark = pytest.mark.e2e


def event(seq: int) -> dict[str, Any]:
    return {"seq": seq, "event_id": f"e{seq}", "type": "door.opened",
            "at": "2026-11-29T03:00:00Z", "locker_id": "L1", "compartment": "1",
            "code_id": None, "data": {}}


def test_ack_tracker_never_passes_a_gap_and_prints_each_seq_once() -> None:
    t = AckTracker(4)
    printed = []
    for seq in (5, 6, 8, 9):
        printed += [e["seq"] for e in t.offer(event(seq), seq)]
    assert (t.upto, t.gap) == (6, True), "8 and 9 wait for 7"
    for seq in (6, 7, 8, 10, 3):
        printed += [e["seq"] for e in t.offer(event(seq), seq)]
    assert printed == [5, 6, 7, 8, 9, 10]
    assert (t.upto, t.gap) == (10, False)


def test_ack_tracker_passes_the_gaps_an_outbox_shed_event_names() -> None:
    t = AckTracker(0)
    assert [e["seq"] for e in t.offer(event(1), 1)] == [1]
    assert t.offer(event(4), 4) == []  # 2 and 3 are missing: held back
    shed = {**event(6), "type": "outbox.shed", "data": {"count": 3, "seqs": [[2, 3], [5, 5]]}}
    assert [e["seq"] for e in t.offer(shed, 6)] == [4, 6]
    assert (t.upto, t.gap) == (6, False)
    junk = {**event(8), "type": "outbox.shed", "data": {"seqs": [[7, True], "x", [9, 7]]}}
    assert t.offer(junk, 8) == [] and t.upto == 6, "a malformed run names no gap"


async def test_events_with_a_gap_are_asked_again_and_acked_in_order(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bank played by hand: lockerctl asks resend at start, holds seq 3 back until 2 came."""
    state = tmp_path / "L1.state"
    async with aiomqtt.Client(broker.host, broker.port) as bank:
        await bank.subscribe("lockers/L1/events/#", qos=1)
        cli = asyncio.create_task(asyncio.to_thread(lockerctl, [
            "events", "--broker", broker.address, "--locker", "L1", "--ack", "--state",
            str(state), "--count", "3", "--wait", "20"]))
        acks, resends = [], []
        async with asyncio.timeout(20):
            async for message in bank.messages:
                body = json.loads(message.payload)
                if message.topic.matches("lockers/L1/events/resend"):
                    resends.append(body["from_seq"])
                    # First the live stream with seq 2 lost, then what was asked for.
                    seqs = [1, 3] if len(resends) == 1 else [2, 3]
                    for seq in seqs:
                        await bank.publish("lockers/L1/events", json.dumps(event(seq)), qos=1)
                elif message.topic.matches("lockers/L1/events/ack"):
                    acks.append(body["upto_seq"])
                    if acks[-1] == 3:
                        break
        assert await asyncio.wait_for(cli, 30) == 0
    assert resends == [1, 2]
    assert acks == [1, 3]
    captured = capsys.readouterr()
    assert [json.loads(line)["seq"] for line in captured.out.splitlines()] == [1, 2, 3]
    assert "gap: seq 3 came after 1: asking lockers/L1/events/resend from seq 2" in captured.err
    assert json.loads(state.read_text()) == {"locker_id": "L1", "upto_seq": 3}


async def test_events_ack_without_state_acknowledges_nothing(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as bank:
        await bank.subscribe("lockers/L1/events/#", qos=1)
        cli = asyncio.create_task(asyncio.to_thread(lockerctl, [
            "events", "--broker", broker.address, "--locker", "L1", "--ack", "--count", "1",
            "--wait", "20"]))
        # No state: no resend either, so wait until lockerctl is subscribed by sending
        # until it prints something.
        async with asyncio.timeout(20):
            while not cli.done():
                await bank.publish("lockers/L1/events", json.dumps(event(7)), qos=1)
                await asyncio.wait({cli}, timeout=0.2)
        assert await cli == 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                async for message in bank.messages:
                    assert not message.topic.matches("lockers/L1/events/ack"), "acked"
    err = capsys.readouterr().err
    assert "--ack without --state acknowledges nothing" in err


@pytest.mark.parametrize("content", ['{"locker_id": "L2", "upto_seq": 3}', "{not json",
                                     '{"locker_id": "L1", "upto_seq": -2}'])
def test_a_state_file_of_another_bank_or_garbage_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    state = tmp_path / "s.json"
    state.write_text(content)
    status = lockerctl(["events", "--broker", "127.0.0.1:1", "--locker", "L1", "--ack",
                        "--state", str(state)])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert f"--state {state}" in err
    assert state.read_text() == content, "left as it was"


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
                got[str(message.topic)] = message.payload
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
