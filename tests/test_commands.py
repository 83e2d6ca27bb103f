"""Remote commands over a real Mosquitto: every refusal answered, at most once, door rules."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from conftest import Running, running, stored_events, wait_until
from test_sync_mqtt import mqtt_overrides, publish, raw_publish, watching

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.timeutil import utcnow
from sim.client import SimClient

pytestmark = pytest.mark.e2e

CODE = "482913"


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    # The keyring file names the root key for the commands role: kit.command signs with it.
    return make_kit([PlainCode("p-1", CODE, "3", parcel_id="PX1")], parcels=["3"],
                    overrides=mqtt_overrides(broker))


async def results(w: Any, cmd_id: str, count: int = 1) -> list[dict[str, Any]]:
    await wait_until(lambda: len([r for r in w.on("cmd/result") if r["cmd_id"] == cmd_id])
                     >= count, what=f"cmd/result for {cmd_id}")
    return [r for r in w.on("cmd/result") if r["cmd_id"] == cmd_id]


async def connected(r: Running) -> None:
    assert r.app.link is not None
    await asyncio.wait_for(r.app.link.subscribed.wait(), 10)


REFUSALS: dict[str, tuple[str, Callable[[BankKit], bytes]]] = {
    "expired": ("expired", lambda k: k.command("clear_lockout", cmd_id="c-exp",
                                               expires_at=utcnow() - timedelta(seconds=1))),
    "another locker": ("wrong_locker", lambda k: k.command("clear_lockout", cmd_id="c-oth",
                                                           locker_id="L2")),
    "signed by the codes key": ("signature", lambda k: k.command(
        "clear_lockout", cmd_id="c-sig", signer=k.codes_key)),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusals_are_answered_with_the_reason(kit: BankKit, broker: Broker,
                                                     case: str) -> None:
    reason, make = REFUSALS[case]
    raw = make(kit)
    cmd_id = json.loads(__import__("base64").b64decode(json.loads(raw)["payload"]))["cmd_id"]
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        await raw_publish(broker, "lockers/L1/cmd", raw)
        [result] = await results(w, cmd_id)
        assert result == {"cmd_id": cmd_id, "status": "rejected", "detail": reason}
        event = await r.wait_event("command.result")
        assert (event.data["status"], event.data["reason"]) == ("rejected", reason)
        assert r.events("command.started") == []


async def test_a_retained_command_is_refused_once_whether_live_or_queued(
    kit: BankKit, broker: Broker
) -> None:
    """Retain As Published shows the publisher's flag on a live and on a queued delivery, and
    Retain Handling 2 keeps the subscription from delivering the retained copy again."""
    live = kit.command("open", cmd_id="c-ret-live", args={"compartment": "5"})
    away = kit.command("open", cmd_id="c-ret-away", args={"compartment": "6"})
    refused = {"status": "rejected", "detail": "retained"}
    async with watching(broker) as w:
        async with running(kit) as r:
            await connected(r)
            await raw_publish(broker, "lockers/L1/cmd", live, retain=True)
            [result] = await results(w, "c-ret-live")
            assert result == {"cmd_id": "c-ret-live", **refused}
        # The bank is away: its persistent session queues the next one, retained too.
        await raw_publish(broker, "lockers/L1/cmd", away, retain=True)
        async with running(kit) as r:
            await connected(r)
            [result] = await results(w, "c-ret-away")
            assert result == {"cmd_id": "c-ret-away", **refused}
            # A command behind it: anything the subscription delivered came before it.
            await raw_publish(broker, "lockers/L1/cmd",
                              kit.command("clear_lockout", cmd_id="c-after"))
            [after] = await results(w, "c-after")
            assert after["status"] == "ok"
            assert [e.data["cmd_id"] for e in r.events("command.started")] == ["c-after"]
            assert r.world.pulses == []
            # Clearing the retained copy is no command: it gets no result.
            await raw_publish(broker, "lockers/L1/cmd", b"", retain=True)
            await raw_publish(broker, "lockers/L1/cmd",
                              kit.command("clear_lockout", cmd_id="c-after-2"))
            await results(w, "c-after-2")
    by_id = [x["cmd_id"] for x in w.on("cmd/result")]
    assert sorted(by_id) == ["c-after", "c-after-2", "c-ret-away", "c-ret-live"]
    assert [e for e in stored_events(kit) if e.type == "lock.pulse"] == []


async def test_garbage_on_cmd_is_refused_and_the_daemon_stays_up(kit: BankKit,
                                                                 broker: Broker) -> None:
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        for junk in (b"{", b"\xff\xfe" * 50, b'{"payloadType": 1}', b"[]"):
            await raw_publish(broker, "lockers/L1/cmd", junk)
        await wait_until(lambda: len(w.on("cmd/result")) >= 4, what="4 refusals")
        assert {(x["status"], x["detail"]) for x in w.on("cmd/result")} == {
            ("rejected", "malformed")}
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")


async def test_open_follows_the_door_rules_and_runs_once(kit: BankKit, broker: Broker) -> None:
    raw = kit.command("open", cmd_id="c-open", args={"compartment": "5", "reason": "t-81"})
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        await raw_publish(broker, "lockers/L1/cmd", raw)
        [result] = await results(w, "c-open")
        assert result["status"] == "ok" and "opened" in result["detail"]
        pulse = r.events("lock.pulse")[0]
        assert (pulse.compartment, pulse.data["cmd_id"], pulse.data["kind"]) == (
            "5", "c-open", "command")
        started, = r.events("command.started")
        assert started.seq < pulse.seq, "journalled before the pulse"
        assert r.events("pickup.opened") == [], "a command consumes no code"
        # The same command again, now and after a restart: refused as a replay.
        await raw_publish(broker, "lockers/L1/cmd", raw)
        replay = (await results(w, "c-open", 2))[1]
        assert replay == {"cmd_id": "c-open", "status": "rejected", "detail": "replay"}
    async with watching(broker) as w2, running(kit) as r2:
        await connected(r2)
        await raw_publish(broker, "lockers/L1/cmd", raw)
        [again] = await results(w2, "c-open")
        assert again["detail"] == "replay"
        assert r2.world.pulses == []


async def test_open_of_a_jammed_lock_is_an_error_and_marks_the_compartment(
    kit: BankKit, broker: Broker
) -> None:
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        r.world.set_fault("lock:6", "jam", True)
        await raw_publish(broker, "lockers/L1/cmd",
                          kit.command("open", cmd_id="c-jam", args={"compartment": "6"}))
        [result] = await results(w, "c-jam")
        assert result["status"] == "error" and "jammed" in result["detail"]
        assert r.world.pulses == ["6", "6"]
        assert not r.app.controller.compartments["6"].in_service
        # Out of service now: a second open is an error without a pulse ...
        await raw_publish(broker, "lockers/L1/cmd",
                          kit.command("open", cmd_id="c-jam2", args={"compartment": "6"}))
        [second] = await results(w, "c-jam2")
        assert second["status"] == "error" and "out of service" in second["detail"]
        # ... until set_service puts it back.
        await raw_publish(broker, "lockers/L1/cmd", kit.command(
            "set_service", cmd_id="c-svc", args={"compartment": "6", "in_service": True,
                                                 "reason": "fixed"}))
        [svc] = await results(w, "c-svc")
        assert svc["status"] == "ok"
        assert r.app.controller.compartments["6"].in_service
        assert r.events("compartment.in_service")[0].data["reason"] == "fixed"


async def test_selftest_pulses_only_an_empty_compartment(kit: BankKit, broker: Broker) -> None:
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        await raw_publish(broker, "lockers/L1/cmd", kit.command(
            "selftest", cmd_id="c-st-full", args={"compartment": "3"}))
        [full] = await results(w, "c-st-full")
        assert "lock 3: skipped" in full["detail"]
        assert r.world.pulses == []
        await raw_publish(broker, "lockers/L1/cmd", kit.command(
            "selftest", cmd_id="c-st-empty", args={"compartment": "4"}))
        [empty] = await results(w, "c-st-empty")
        assert empty["status"] == "ok" and "lock 4: opened" in empty["detail"]
        assert r.world.pulses == ["4"]
        r.world.set_fault("scanner", "dead", True)
        await raw_publish(broker, "lockers/L1/cmd", kit.command("selftest", cmd_id="c-st"))
        [dev] = await results(w, "c-st")
        assert dev["status"] == "error" and "scanner" in dev["detail"]
        event = next(e for e in r.events("command.result") if e.data["cmd_id"] == "c-st")
        assert event.data["devices"]["scanner"]["ok"] is False


async def test_resync_and_clear_lockout(kit: BankKit, broker: Broker) -> None:
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        for i in range(3):
            r.world.press(f"00000{i}#")
        await r.wait_event("keypad.lockout")
        before = len(w.on("sync/request"))
        await raw_publish(broker, "lockers/L1/cmd", kit.command("resync", cmd_id="c-rs"))
        await raw_publish(broker, "lockers/L1/cmd", kit.command("clear_lockout", cmd_id="c-cl"))
        await results(w, "c-cl")
        assert len(w.on("sync/request")) > before
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")


async def test_a_crash_mid_command_is_reported_unknown_and_not_rerun(
    kit: BankKit, broker: Broker
) -> None:
    cmd = [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path)]
    async with watching(broker) as w:
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.DEVNULL)
        try:
            await wait_until(lambda: any(s.get("status") == "online" for s in w.on("state")),
                             timeout=15, what="daemon online")
            async with SimClient(kit.socket_path) as sim:
                # A jammed lock keeps the open command running for two door timeouts.
                await sim.fault("lock:7", "jam", True)
            await raw_publish(broker, "lockers/L1/cmd",
                              kit.command("open", cmd_id="c-crash", args={"compartment": "7"}))
            await wait_until(lambda: any(e.get("type") == "lock.pulse"
                                         for e in w.on("events")), what="the first pulse")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.DEVNULL)
        try:
            [result] = await results(w, "c-crash")
            assert result["status"] == "unknown"
            async with SimClient(kit.socket_path) as sim:
                state = await sim.state()
            assert state["compartments"]["7"]["locked"] is True
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    assert [e["data"]["status"] for e in w.on("events") if e["type"] == "command.result"
            and e["data"]["cmd_id"] == "c-crash"] == ["unknown"]


async def test_commands_published_by_lockerctl(kit: BankKit, broker: Broker) -> None:
    from lockerd.cli.lockerctl_cmd import main as lockerctl

    path = kit.directory / "cmd.json"
    status = await asyncio.to_thread(lockerctl, [
        "command", "--locker", "L1", "--action", "open", "--compartment", "2", "--reason",
        "ticket 81", "--expires-in", "5m", "--sign", str(kit.directory / "keys" / "root.key"),
        "--cmd-id", "c-ctl", "-o", str(path)])
    assert status == 0
    async with watching(broker) as w, running(kit) as r:
        await connected(r)
        await publish(kit, broker, path.read_bytes(), "cmd2.json")
        [result] = await results(w, "c-ctl")
        assert result["status"] == "ok"
        assert r.events("command.started")[0].data["reason"] == "ticket 81"
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe("lockers/L1/cmd", qos=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await anext(aiter(c.messages))  # nothing retained on cmd
