"""The outbox publisher: every event to the backend, in seq order, until acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt

from lockerd import jsonsafe
from lockerd.logs import get_logger
from lockerd.mqtt import Topics
from lockerd.services.link import MqttLink, NotConnected
from lockerd.services.sync import payload_bytes
from lockerd.store.db import Database
from lockerd.store.outbox import Outbox
from lockerd.store.writer import InlineWriter, Writer

log = get_logger("lockerd.outbox")

BATCH = 500
RETRY_S = 5.0
MAX_RESEND_BYTES = 128  # {"from_seq": N} with N up to 2**63 fits many times over
MAX_SEQ = 2**63 - 1  # SQLite's largest integer


class OutboxPublisher:
    """Publishes unacknowledged events at QoS 1, pipelined: up to the link's in-flight window
    of PUBACKs outstanding at once, sent in seq order. After a reconnect it starts again
    from the last acknowledged seq; the backend deduplicates by event_id. A backend that
    missed events asks `events/resend` (PROTOCOL section 5): publishing goes back to that
    seq at once, in the same session, and carries on in order from there.
    """

    def __init__(
        self,
        *,
        link: MqttLink,
        topics: Topics,
        outbox: Outbox,
        locker_id: str,
        on_shed: Callable[[int, tuple[tuple[int, int], ...]], Awaitable[object]] | None = None,
        on_full: Callable[[int], Awaitable[object]] | None = None,
        writer: Writer | None = None,
    ) -> None:
        self._link = link
        # The acknowledgement mark, the pruning and the shedding are writes: the writer's.
        self._writer: Writer = writer or InlineWriter(outbox.db)
        self._topics = topics
        self._outbox = outbox
        self._locker_id = locker_id
        self._on_shed = on_shed
        self._on_full = on_full
        self._wake = asyncio.Event()
        self._check_pressure = asyncio.Event()
        self._full_reported = False
        self._rewind: int | None = None  # publish again everything after this seq
        self._delivered: dict[int, asyncio.Event] = {}  # seqs someone waits to see PUBACKed
        self.published_upto = 0  # highest seq handed to the broker in this process
        self.confirmed = 0
        self.resends = 0
        self._ack_target = 0  # the highest valid ack received, written by _write_acks
        self._ack_task: asyncio.Task[None] | None = None
        link.handle(topics.events_ack, self._on_ack)
        link.handle(topics.events_resend, self._on_resend)

    def wake(self) -> None:
        """New events were committed (EventLog.on_append)."""
        self._wake.set()
        self._check_pressure.set()

    async def wait_delivered(self, seq: int) -> None:
        """Return once the event `seq` is acknowledged by the broker (PUBACK), from now on.

        Called right after the event is committed, before the publisher can have sent it."""
        event = self._delivered.setdefault(seq, asyncio.Event())
        try:
            await event.wait()
        finally:
            self._delivered.pop(seq, None)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._guard(), name="outbox.guard")
            tg.create_task(self._publish(), name="outbox.publish")

    async def _guard(self) -> None:
        """Keep the outbox bounded whether or not the broker is reachable."""
        while True:
            await self._check_pressure.wait()
            self._check_pressure.clear()
            # last_seq - acked_upto bounds the depth from above and costs one index lookup.
            if self._outbox.upper_bound_depth() > self._outbox.max_events:
                await self._relieve_pressure()

    async def _publish(self) -> None:
        while True:
            await self._link.connected.wait()
            try:
                await self._drain()
            except NotConnected as exc:
                log.info("outbox paused", error=str(exc))
            # Down: wait for the next session. Still up (a PUBACK timed out): retry shortly.
            # asyncio.timeout: wait_for (3.11) can swallow a cancellation racing the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETRY_S):
                    await self._link.disconnected.wait()

    async def _drain(self) -> None:
        window = asyncio.Semaphore(self._link.max_inflight)
        inflight: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []
        sent = self._outbox.acked_upto()
        self._rewind = None  # a new session starts from the acknowledged seq anyway
        try:
            while self._link.connected.is_set():
                if failure:
                    raise NotConnected(str(failure[0]))
                if self._rewind is not None:
                    sent, self._rewind = min(sent, self._rewind), None
                self._wake.clear()
                batch = self._outbox.pending_wire(sent, BATCH, self._locker_id)
                if not batch:
                    await self._wait_for_work()
                    continue
                for seq, body in batch:
                    await window.acquire()
                    if failure or self._rewind is not None:
                        window.release()
                        break
                    # Tasks start in creation order, and each hands its message to the MQTT
                    # client before its first await: the broker receives them in seq order.
                    task = asyncio.create_task(self._publish_one(seq, body, window, failure))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    sent = seq
                    self.published_upto = max(self.published_upto, sent)
        finally:
            for task in list(inflight):
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _publish_one(self, seq: int, body: str, window: asyncio.Semaphore,
                           failure: list[BaseException]) -> None:
        try:
            await self._link.publish(self._topics.events, body, qos=1)
            self.confirmed += 1
            if (waiting := self._delivered.get(seq)) is not None:
                waiting.set()
        except NotConnected as exc:
            failure.append(exc)
        finally:
            window.release()

    async def _wait_for_work(self) -> None:
        wake = asyncio.create_task(self._wake.wait())
        down = asyncio.create_task(self._link.disconnected.wait())
        try:
            await asyncio.wait({wake, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            down.cancel()

    async def _relieve_pressure(self) -> None:
        outbox = self._outbox
        pressure = await self._writer.run(lambda db: outbox.on(db).shed(), durable=False)
        if pressure.shed:
            log.warning("outbox over its limit: telemetry events shed", shed=pressure.shed,
                        depth=pressure.depth, limit=self._outbox.max_events)
            if self._on_shed is not None:
                await self._on_shed(pressure.shed, pressure.shed_runs)
        if pressure.over_limit and not self._full_reported:
            self._full_reported = True
            log.error("outbox full of access and fault events; none is dropped",
                      depth=pressure.depth, limit=self._outbox.max_events)
            if self._on_full is not None:
                await self._on_full(pressure.depth)
        elif not pressure.over_limit:
            self._full_reported = False

    async def _on_ack(self, message: aiomqtt.Message) -> None:
        upto = _parse_ack(payload_bytes(message))
        if upto is None:
            log.warning("events/ack payload refused: expected {\"upto_seq\": N}",
                        payload=payload_bytes(message)[:80].decode("utf-8", "replace"))
            return
        if upto > self.published_upto:
            # An ack for events never sent would prune events the backend has not got.
            log.warning("events/ack beyond what was published; refused", upto_seq=upto,
                        published_upto=self.published_upto)
            return
        # Only the highest ack matters: it is written by one task, the newest at each turn,
        # so a backend acking every event never waits on the writer (nor fills the inbox).
        if upto <= self._ack_target:
            return
        self._ack_target = upto
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._write_acks(), name="outbox.ack")
            self._ack_task.add_done_callback(_log_ack_failure)

    async def _write_acks(self) -> None:
        outbox = self._outbox
        while (target := self._ack_target) > outbox.acked_upto():
            after = await self._writer.run(functools.partial(_ack_on, outbox, target),
                                           durable=False)
            log.debug("events acknowledged", upto_seq=after)

    async def _on_resend(self, message: aiomqtt.Message) -> None:
        raw = payload_bytes(message)
        from_seq = _parse_resend(raw)
        if from_seq is None:
            log.warning("events/resend payload refused: expected {\"from_seq\": N}, N >= 0",
                        payload=raw[:80].decode("utf-8", "replace"), size=len(raw))
            return
        acked = self._outbox.acked_upto()
        # Below the acknowledged seq there is nothing owed: start at the oldest unacknowledged.
        self._rewind = max(from_seq - 1, acked)
        self.resends += 1
        self._wake.set()
        log.info("events/resend: publishing again", from_seq=from_seq,
                 starting_after=self._rewind, published_upto=self.published_upto)


def _log_ack_failure(task: asyncio.Task[None]) -> None:
    """The mark is written again by the next ack; a failure is logged, never lost silently."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("could not write the events/ack mark", error=repr(exc))


def _ack_on(outbox: Outbox, upto: int, db: Database) -> int:
    return outbox.on(db).ack(upto)


def _parse_resend(raw: bytes) -> int | None:
    """`{"from_seq": N}` -> N; None for anything else (too long, not JSON, bool, negative)."""
    if len(raw) > MAX_RESEND_BYTES:
        return None
    return _seq_field(raw, "from_seq")


def _parse_ack(raw: bytes) -> int | None:
    """`{"upto_seq": N}` -> N; None for anything else."""
    return _seq_field(raw, "upto_seq")


def _seq_field(raw: bytes, name: str) -> int | None:
    """The seq a one-field JSON object holds under `name`, or None when it holds none: not
    JSON, not an object, not an integer (a bool is none), or out of 0..MAX_SEQ."""
    try:
        body: Any = jsonsafe.loads(raw)
    except jsonsafe.JsonInputError:
        return None
    if not isinstance(body, dict):
        return None
    seq = body.get(name)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        return None
    return seq
