"""events/resend over a real Mosquitto: a backend that came late gets every event it missed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import Broker
from conftest import RunFn, Running, running, wait_until
from test_sync_mqtt import Watcher, mqtt_overrides, raw_publish, watching

from lockerd.core.actions import Record
from lockerd.dev.provision import BankKit

pytestmark = pytest.mark.e2e


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return make_kit([], overrides=mqtt_overrides(broker))


async def published_alone(r: Running, count: int) -> int:
    """Commit `count` events while nobody is subscribed and wait until they are handed to the
    broker (which drops them: no session wants them). Returns the last seq."""
    assert r.app.link is not None and r.app.publisher is not None
    await asyncio.wait_for(r.app.link.subscribed.wait(), 10)
    for i in range(count):
        await r.app.controller.commit(Record("tamper", data={"open": i % 2 == 0}))
    last = r.app.events.last_seq()
    publisher = r.app.publisher
    # Confirmed by the broker (PUBACK), not only handed to the client: each of 1..last is
    # published once before any resend, so `confirmed` counts them.
    await wait_until(lambda: publisher.published_upto >= last and publisher.confirmed >= last,
                     what="events published")
    return last


def seqs_on(w: Watcher) -> list[int]:
    return [e["seq"] for e in w.on("events")]


async def test_resend_republishes_at_once_in_order_without_a_reconnect(
    kit: BankKit, broker: Broker
) -> None:
    async with running(kit) as r:
        last = await published_alone(r, 5)
        assert r.app.link is not None
        connects = r.app.link.status.connects
        async with watching(broker) as w:
            await raw_publish(broker, "lockers/L1/events/resend", b'{"from_seq": 3}')
            await wait_until(lambda: last in seqs_on(w), what="the resent events")
            assert seqs_on(w) == list(range(3, last + 1))
            assert r.app.link.status.connects == connects, "no reconnect was needed"
            # Below the acknowledged seq: from the oldest unacknowledged one.
            await raw_publish(broker, "lockers/L1/events/ack", b'{"upto_seq": 4}')
            await wait_until(lambda: r.app.outbox.acked_upto() == 4, what="ack 4")
            before = len(seqs_on(w))
            await raw_publish(broker, "lockers/L1/events/resend", b'{"from_seq": 0}')
            await wait_until(lambda: len(seqs_on(w)) >= before + last - 4, what="resent again")
            assert seqs_on(w)[before:] == list(range(5, last + 1))


async def test_garbage_on_resend_is_refused_and_the_daemon_stays_up(
    kit: BankKit, broker: Broker
) -> None:
    async with running(kit) as r:
        last = await published_alone(r, 2)
        assert r.app.publisher is not None
        async with watching(broker) as w:
            for junk in (b"{", b"[]", b'{"from_seq": -1}', b'{"from_seq": true}',
                         b'{"from_seq": "1"}', b'{"from_seq": 1.5}',
                         b'{"from_seq": 99999999999999999999999}',
                         b'{"from_seq": 1, "pad": "' + b"x" * 200 + b'"}',
                         b"\xff\xfe", b""):
                await raw_publish(broker, "lockers/L1/events/resend", junk)
            # Handled in order: once this one is answered, every refusal was seen.
            await raw_publish(broker, "lockers/L1/events/resend", b'{"from_seq": 1}')
            await wait_until(lambda: last in seqs_on(w), what="the valid resend answered")
            assert r.app.publisher.resends == 1
            assert seqs_on(w) == list(range(1, last + 1))
        r.world.force_door("1")
        await r.wait_event("door.forced")
        assert r.app.outbox.depth() == r.app.events.last_seq()


async def test_lockerctl_started_late_asks_resend_and_acks_only_what_it_got(
    kit: BankKit, broker: Broker, run: RunFn, tmp_path: Path
) -> None:
    state = tmp_path / "L1.state"
    async with running(kit) as r:
        last = await published_alone(r, 4)
        assert r.app.outbox.acked_upto() == 0
        assert r.app.outbox.depth() == last, "the outbox keeps what nobody acknowledged"
        argv = ["events", "--broker", broker.address, "--locker", "L1", "--ack", "--state",
                str(state), "--count", str(last), "--wait", "30"]
        result = await asyncio.to_thread(run, *argv)
        assert result.status == 0
        printed = [json.loads(line) for line in result.out.splitlines()]
        assert [e["seq"] for e in printed] == list(range(1, last + 1))
        assert "asking lockers/L1/events/resend from seq 1" in result.err
        assert f"acknowledged up to seq {last}" in result.err
        await wait_until(lambda: r.app.outbox.acked_upto() == last, what="acked up to N")
        assert json.loads(state.read_text()) == {"locker_id": "L1", "upto_seq": last}
        # Started again, it asks from where it stopped and prints only what is new.
        await r.app.controller.commit(Record("tamper", data={"open": True}))
        result = await asyncio.to_thread(run, *argv[:-4], "--count", "1", "--wait", "30")
        assert [json.loads(line)["seq"] for line in result.out.splitlines()] == [last + 1]
        assert f"asking lockers/L1/events/resend from seq {last + 1}" in result.err
        await wait_until(lambda: r.app.outbox.acked_upto() == last + 1, what="acked N+1")


async def test_lockerctl_acks_past_the_gaps_a_full_outbox_left(
    make_kit: Callable[..., BankKit], broker: Broker, run: RunFn, tmp_path: Path
) -> None:
    """Shed telemetry events leave gaps that no resend fills: `outbox.shed` names them, so a
    backend that never acknowledges past a gap still gets to the end."""
    kit = make_kit([], overrides={**mqtt_overrides(broker), "outbox": {"max_events": 100}})
    async with running(kit) as r:
        assert r.app.link is not None
        await asyncio.wait_for(r.app.link.subscribed.wait(), 10)
        for i in range(60):  # telemetry-class door movements between access events
            await r.app.controller.commit(Record("door.opened" if i % 2 else "tamper",
                                           data={"open": True}))
            await r.app.controller.commit(Record("tamper", data={"open": False}))
        await r.wait_event("outbox.shed")
        # Recorded by the outbox's guard right after the shedding, in the same turn of it.
        await wait_until(lambda: any(e.data.get("device") == "outbox"
                                     for e in r.events("hardware.fault")), what="outbox full")
        last = r.app.events.last_seq()
        shed = [e for e in r.events("outbox.shed")]
        assert sum(e.data["count"] for e in shed) > 0
        kept = r.app.outbox.depth()
        result = await asyncio.to_thread(
            run, "events", "--broker", broker.address, "--locker", "L1", "--ack", "--state",
            str(tmp_path / "L1.state"), "--count", str(kept), "--wait", "30")
        assert result.status == 0
        printed = [json.loads(line)["seq"] for line in result.out.splitlines()]
        assert printed == sorted(printed) and printed[-1] == last
        gone = {s for e in shed for a, b in e.data["seqs"] for s in range(a, b + 1)}
        assert set(printed) | gone == set(range(1, last + 1)), "every seq printed or shed"
        await wait_until(lambda: r.app.outbox.acked_upto() == last, what="acked to the end")
