"""The outbox: every event delivered in seq order until acknowledged, through outages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from conftest import running, wait_until
from test_sync_mqtt import mqtt_overrides, raw_publish

from lockerd.core.actions import Record
from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store import EventLog, open_database
from lockerd.store.outbox import Outbox

pytestmark = pytest.mark.e2e

T = datetime(2026, 11, 29, tzinfo=UTC)


def filled(tmp_path: Path, types: list[str], *, max_events: int = 100) -> tuple[Outbox, Any]:
    db = open_database(tmp_path / "x.db")
    log = EventLog(db)
    for t in types:
        log.record(type=t, at=T)
    return Outbox(db, max_events=max_events, keep_acked=2), db


def test_pending_ack_and_prune(tmp_path: Path) -> None:
    box, db = filled(tmp_path, ["tamper"] * 10)
    assert [e.seq for e in box.pending(0, 3)] == [1, 2, 3]
    assert box.depth() == 10
    assert box.ack(6) == 6
    assert box.ack(4) == 6, "an older ack changes nothing"
    assert [e.seq for e in box.pending(0, 100)] == [7, 8, 9, 10]
    assert db.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 10, (
        "an ack only moves the mark; pruning waits for a batch")
    assert box.prune() == 4
    kept = [r[0] for r in db.conn.execute("SELECT seq FROM events ORDER BY seq")]
    assert kept == [5, 6, 7, 8, 9, 10], "keep_acked=2 acknowledged events stay for the console"


def test_ack_prunes_in_batches(tmp_path: Path) -> None:
    from lockerd.store.outbox import PRUNE_BATCH

    box, db = filled(tmp_path, ["tamper"] * (PRUNE_BATCH + 10), max_events=10**6)
    box.ack(PRUNE_BATCH)
    assert db.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == PRUNE_BATCH + 10
    box.ack(PRUNE_BATCH + 5)
    assert db.conn.execute("SELECT MIN(seq) FROM events").fetchone()[0] == PRUNE_BATCH + 4


def test_wire_bodies_built_by_sqlite_match_the_event_shape(tmp_path: Path) -> None:
    db = open_database(tmp_path / "x.db")
    log = EventLog(db)
    log.record(type="pickup.opened", at=T, compartment="7", code_id="p-1",
               data={"attempt": 1, "note": "é \"quoted\""})
    log.record(type="tamper", at=T, data={})
    box = Outbox(db, max_events=100)
    bodies = box.pending_wire(0, 10, "L1")
    events = box.pending(0, 10)
    assert [json.loads(body) for _, body in bodies] == [e.wire("L1") for e in events]
    assert [seq for seq, _ in bodies] == [1, 2]


def test_shedding_drops_telemetry_only_and_reports_access_overflow(tmp_path: Path) -> None:
    types = ["door.opened", "pickup.opened", "door.closed", "pickup.completed"] * 30
    box, db = filled(tmp_path, types, max_events=100)
    pressure = box.shed()
    assert (pressure.shed, pressure.depth, pressure.over_limit) == (20, 100, False)
    left = [r[0] for r in db.conn.execute("SELECT type FROM events")]
    assert left.count("pickup.opened") == 30 and left.count("pickup.completed") == 30
    # door.opened and door.closed alternate with access events: every other seq, from 1.
    assert pressure.shed_runs == tuple((s, s) for s in range(1, 41, 2))[:20]
    box2, _ = filled(tmp_path / "b", ["pickup.opened"] * 120, max_events=100)
    pressure = box2.shed()
    assert (pressure.shed, pressure.depth, pressure.over_limit) == (0, 120, True)


class Backend:
    """A backend's event consumer: a persistent session, so nothing published while it is
    away is lost, acknowledging as it stores."""

    def __init__(self, broker: Broker, *, ack: bool = True) -> None:
        self.broker = broker
        self.ack = ack
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Backend:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready))
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier="backend-1",
                                  clean_session=False) as c:
            await c.subscribe("lockers/L1/events", qos=1)
            ready.set()
            async for m in c.messages:
                event = json.loads(m.payload)
                self.events.append(event)
                if self.ack:
                    await c.publish("lockers/L1/events/ack",
                                    json.dumps({"upto_seq": event["seq"]}), qos=1)

    def distinct_seqs(self) -> list[int]:
        seen: dict[int, dict[str, Any]] = {}
        for e in self.events:
            seen.setdefault(e["seq"], e)
        return sorted(seen)


async def test_thousands_of_events_survive_an_outage_in_order(
    make_kit: Callable[..., BankKit], bank_dir: Path
) -> None:
    d = bank_dir / "pbroker"
    d.mkdir()
    broker = Broker(d, persistence=True, extra_config="max_queued_messages 0")
    broker.start()
    try:
        kit = make_kit([PlainCode("p-1", "482913", "3", parcel_id="PX1", max_uses=100)],
                       parcels=["3"], overrides=mqtt_overrides(broker))
        async with Backend(broker, ack=False):
            pass  # create the backend's persistent session before the outage
        async with running(kit) as r:
            assert r.app.link is not None
            await asyncio.wait_for(r.app.link.subscribed.wait(), 10)
            broker.stop()
            await wait_until(lambda: not r.app.link.status.connected,  # type: ignore[union-attr]
                             what="link down")
            r.world.press("482913#")  # a real pickup among the pile
            await r.wait_event("pickup.opened")
            for i in range(3000):
                await r.app.controller.commit(Record("tamper", data={"open": i % 2 == 0}))
            last = r.app.events.last_seq()
            assert r.app.outbox.depth() == last
            broker.start()
            async with Backend(broker) as backend:
                await wait_until(lambda: r.app.outbox.depth() == 0, timeout=60,
                                 what="every event acknowledged")
                seqs = [e["seq"] for e in backend.events]
        got = backend.distinct_seqs()
        assert got == list(range(1, got[-1] + 1)) and got[-1] >= last, "none lost"
        firsts: list[int] = []
        for s in seqs:
            if s not in firsts:
                firsts.append(s)
        assert firsts == sorted(firsts), "first deliveries arrive in seq order"
        types = {e["type"] for e in backend.events}
        assert {"pickup.opened", "lock.pulse", "tamper", "daemon.started"} <= types
        one = next(e for e in backend.events if e["type"] == "pickup.opened")
        assert set(one) == {"seq", "event_id", "type", "at", "locker_id", "compartment",
                            "code_id", "data"}
        assert (one["locker_id"], one["compartment"], one["code_id"]) == ("L1", "3", "p-1")
    finally:
        broker.stop()


async def test_unacknowledged_events_are_republished_after_reconnect(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    kit = make_kit([], overrides=mqtt_overrides(broker))
    async with Backend(broker, ack=False) as backend, running(kit) as r:
        await wait_until(lambda: len(backend.distinct_seqs()) >= 1, what="daemon.started")
        first = len(backend.events)
        broker.restart()  # fresh broker: the backend reconnects... as does the daemon
    async with Backend(broker, ack=True) as backend2, running(kit) as r:
        await wait_until(lambda: r.app.outbox.depth() == 0, timeout=20, what="all acked")
        # The first daemon.started was never acknowledged: it came again, same event_id.
        ids = {e["event_id"] for e in backend.events[:first]}
        assert ids <= {e["event_id"] for e in backend2.events}


async def test_bad_and_premature_acks_change_nothing(make_kit: Callable[..., BankKit],
                                                     broker: Broker) -> None:
    kit = make_kit([], overrides=mqtt_overrides(broker))
    async with Backend(broker, ack=False), running(kit) as r:
        assert r.app.publisher is not None
        await wait_until(lambda: r.app.publisher.published_upto >= 1,  # type: ignore[union-attr]
                         what="first event out")
        # Events go out as soon as the bank connects, before it has subscribed to every
        # topic: an ack published before its subscription would be lost, not refused.
        assert r.app.link is not None
        await wait_until(r.app.link.subscribed.is_set, what="every topic subscribed")
        for junk in (b"{", b'{"upto_seq": "5"}', b'{"upto_seq": -1}', b"[]",
                     b'{"upto_seq": true}', b'{"upto_seq": 999999}'):
            await raw_publish(broker, "lockers/L1/events/ack", junk)
        r.world.force_door("1")
        await r.wait_event("door.forced")
        assert r.app.outbox.acked_upto() == 0
        assert r.app.outbox.depth() == r.app.events.last_seq()
        await raw_publish(broker, "lockers/L1/events/ack", b'{"upto_seq": 1}')
        await wait_until(lambda: r.app.outbox.acked_upto() == 1, what="a valid ack")


@pytest.mark.parametrize("max_events", [100])
async def test_a_full_outbox_of_access_events_is_reported_not_dropped(
    make_kit: Callable[..., BankKit], max_events: int, bank_dir: Path
) -> None:
    from broker import free_port

    # A broker that is never there: the outbox only fills.
    kit = make_kit([], overrides={"outbox": {"max_events": max_events},
                                  "mqtt": {"host": "127.0.0.1", "port": free_port(),
                                           "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}})
    async with running(kit) as r:
        for _ in range(max_events + 20):
            await r.app.controller.commit(Record("code.rejected", data={"reason": "unknown_code"}))
        for _ in range(30):
            await r.app.controller.commit(Record("door.opened", compartment="1"))
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        types = [r[0] for r in db.conn.execute("SELECT type FROM events")]
    finally:
        db.close()
    assert types.count("code.rejected") == max_events + 20, "no access event dropped"
    assert types.count("door.opened") < 30, "telemetry-class events were shed"
    assert "outbox.shed" in types
    assert "hardware.fault" in types, "a full outbox of access events is reported"
