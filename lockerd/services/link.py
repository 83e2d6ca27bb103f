"""The bank's one MQTT session: connect, reconnect forever, dispatch messages, publish."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from lockerd.core.backoff import Backoff
from lockerd.logs import get_logger
from lockerd.mqtt import BrokerSettings, ack
from lockerd.services.inbox import WINDOW, Inbox, InboxCounts, Refused

log = get_logger("lockerd.link")

_SETTLE_S = 3.0

Handler = Callable[[aiomqtt.Message], Awaitable[None]]
OnConnect = Callable[[], Awaitable[None]]


class NotConnected(Exception):
    """A publish was attempted while the broker is unreachable; the caller keeps the data."""


@dataclass
class LinkStatus:
    """What technicians and telemetry want to know about the broker link."""

    broker: str
    connected: bool = False
    connects: int = 0
    last_connect: datetime | None = None
    last_error: str = ""
    last_error_at: datetime | None = None
    received: int = 0
    refused_too_large: int = 0
    dropped_qos0: int = 0
    deferred: int = 0
    inbox_peak: int = 0


class MqttLink:
    """A persistent MQTT 5 session (clean start false, fixed client id) that comes back by itself.

    Other services register topic handlers and on-connect callbacks before `run`, and
    publish through `publish`, which fails fast with NotConnected while the link is down.
    What comes in is bounded (see lockerd.services.inbox): a QoS 1 message is acknowledged
    only once its handler has run (a command as it starts), the broker is asked to send at
    most WINDOW unacknowledged ones, and what a broker sends beyond twice that is left
    unacknowledged and fetched again by reconnecting once the inbox has drained.
    """

    def __init__(
        self,
        *,
        broker: BrokerSettings,
        will_topic: str,
        will_payload: bytes,
        max_payload_bytes: int,
        backoff: Backoff,
        now: Callable[[], datetime],
        on_too_large: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._broker = broker
        self._will = aiomqtt.Will(will_topic, will_payload, qos=1, retain=True)
        self._closing = False
        self._max_payload = max_payload_bytes
        self._backoff = backoff
        self._now = now
        self._on_too_large = on_too_large
        self._handlers: dict[str, Handler] = {}
        self._publisher_retain: set[str] = set()
        self._at_most_once: set[str] = set()
        self._counts = InboxCounts()
        self._on_connect: list[OnConnect] = []
        self._client: aiomqtt.Client | None = None
        # Goodbyes still running after their session ended, kept so they are not collected.
        self._lingering: set[asyncio.Future[None]] = set()
        # QoS 1 messages in flight at once: the outbox pipelines up to this many.
        self.max_inflight = 100
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self.subscribed = asyncio.Event()  # connected, and every handled topic subscribed
        self.status = LinkStatus(broker=f"{broker.host}:{broker.port}")

    def handle(self, topic: str, handler: Handler, *, publisher_retain: bool = False,
               at_most_once: bool = False) -> None:
        """Route `topic` to `handler`. With `publisher_retain`, the topic is subscribed with
        Retain As Published and Retain Handling 2: the retain flag a handler sees is the one
        the publisher set, and no retained message is sent because of the subscription.

        A message is acknowledged once its handler has run, so one the daemon did not get to
        finish is delivered again; with `at_most_once` it is acknowledged as the handler
        starts, for handlers that journal what they do (a command must never run twice)."""
        self._handlers[topic] = handler
        if publisher_retain:
            self._publisher_retain.add(topic)
        if at_most_once:
            self._at_most_once.add(topic)

    def on_connect(self, callback: OnConnect) -> None:
        self._on_connect.append(callback)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        client = self._client
        if client is None or not self.connected.is_set() or self._closing:
            raise NotConnected(f"not connected to {self.status.broker}")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise NotConnected(str(exc)) from exc

    async def publish_json(self, topic: str, body: Any, **kwargs: Any) -> None:
        await self.publish(topic, json.dumps(body, separators=(",", ":")), **kwargs)

    async def close(self, *, timeout_s: float = _SETTLE_S) -> bool:
        """Leave the broker as a bank that died would: the will's retained `offline` state is
        published (a clean DISCONNECT discards the will), and nothing is published after it.
        Returns whether the broker acknowledged it within `timeout_s`."""
        client = self._client
        self._closing = True
        if client is None or not self.connected.is_set():
            return False
        will = self._will
        try:
            async with asyncio.timeout(timeout_s):
                await client.publish(will.topic, will.payload, qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            # If the link is really gone the broker publishes the will (the same state) once
            # it notices; if the DISCONNECT does get through, the state may stay online.
            log.warning("offline state not confirmed by the broker before disconnecting",
                        error=str(exc) or type(exc).__name__)
            return False
        return True

    async def run(self) -> None:
        while True:
            if self._closing:
                await asyncio.Event().wait()  # closed for good: wait to be cancelled
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self._lost(str(exc))
            delay = self._backoff.next()
            log.info("reconnecting to the broker", broker=self.status.broker,
                     delay_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        client = self._broker.session_client(
            will=self._will, max_payload_bytes=self._max_payload, receive_maximum=WINDOW,
            queue_type=Inbox.factory(max_payload=self._max_payload, counts=self._counts),
            max_inflight=self.max_inflight)
        await self._connect(client)
        try:
            self._client = client
            self.disconnected.clear()
            self.connected.set()
            self.status.connected = True
            self.status.connects += 1
            self.status.last_connect = self._now()
            self._backoff.reset()
            log.info("connected to the broker", broker=self.status.broker,
                     connects=self.status.connects)
            # Handlers run in a worker task, not in the task that reads the socket: a handler
            # waiting for a PUBACK that will never come (the broker just died) must not keep
            # the reader from noticing the disconnect. The worker is cancelled with the session.
            # On-connect callbacks (state, sync request) run once every topic is subscribed,
            # so whoever sees the bank online can talk to it. The inbox applies the same
            # receipt rules as aiomqtt's own queue, so neither grows without bound.
            inbox = Inbox(max_payload=self._max_payload, counts=self._counts)
            self._counts.awaiting_redelivery = 0  # a new connection delivers them again
            worker: asyncio.Task[None] | None = None
            try:
                # One SUBSCRIBE for every topic: one round trip, so a broker that goes away
                # right after the connect is noticed at once, not after a subscribe's timeout.
                if self._handlers:
                    await client.subscribe(
                        [(topic, self._options(topic)) for topic in self._handlers])
                    _raise_if_cancelling()
                self.subscribed.set()
                worker = asyncio.create_task(self._work(client, inbox), name="mqtt.handlers")
                async for message in client.messages:
                    inbox.put_nowait(message)
                    _raise_if_cancelling()
            finally:
                self._client = None
                self.subscribed.clear()
                self.connected.clear()
                self.disconnected.set()
                self.status.connected = False
                if worker is not None:
                    await _stop(worker)
        finally:
            await self._disconnect(client)

    def _options(self, topic: str) -> SubscribeOptions:
        if topic in self._publisher_retain:
            return SubscribeOptions(qos=1, retainAsPublished=True,
                                    retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        return SubscribeOptions(qos=1)

    async def _work(self, client: aiomqtt.Client, inbox: Inbox) -> None:
        for callback in self._on_connect:
            await self._guarded(callback(), what="on-connect callback")
            _raise_if_cancelling()
        while True:
            message = await inbox.get()
            # Acknowledged once handled: a message the daemon did not get to (a crash, a
            # dropped link) is delivered again by the broker, from the persistent session.
            early = str(message.topic) in self._at_most_once
            if early:
                ack(client, message)
            await self._guarded(self._dispatch(message), what=f"handler of {message.topic}")
            if not early:
                ack(client, message)
            _raise_if_cancelling()
            if self._counts.awaiting_redelivery and inbox.empty() and not len(client.messages):
                # Messages left unacknowledged when the inbox was full: a new connection of
                # the same session has the broker deliver them again (MQTT 5, 4.4).
                log.warning("inbox overflowed; reconnecting to have the broker deliver the "
                            "messages left unacknowledged again",
                            messages=self._counts.awaiting_redelivery)
                self._counts.awaiting_redelivery = 0
                await self._disconnect(client)
                return

    async def _guarded(self, work: Awaitable[None], *, what: str) -> None:
        try:
            await work
        except NotConnected as exc:
            log.info("publish skipped; the link is going down", what=what, error=str(exc))
        except Exception:  # one bad message must not stop the sync
            log.exception("MQTT message handling failed; carrying on", what=what)

    def _lost(self, error: str) -> None:
        self.status.last_error = error
        self.status.last_error_at = self._now()
        log.warning("broker link down", broker=self.status.broker, error=error)

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        self.status.received += 1
        handler = self._handlers.get(topic)
        if handler is None:
            log.warning("message on a topic nobody handles; ignored", topic=topic)
            return
        self.status.refused_too_large = self._counts.refused_too_large
        self.status.dropped_qos0 = self._counts.dropped_qos0
        self.status.deferred = self._counts.deferred
        self.status.inbox_peak = self._counts.peak
        if isinstance(message, Refused):
            # Refused at receipt (lockerd.services.inbox): only its size was kept.
            log.warning("payload over the configured limit; refused", topic=topic,
                        size=message.size, limit=self._max_payload)
            if self._on_too_large is not None:
                await self._on_too_large(topic, message.size)
            return
        await handler(message)

    async def _connect(self, client: aiomqtt.Client) -> None:
        """Connect; a cancellation (shutdown) mid-connect waits for the connect to settle first.

        aiomqtt's connect must not be cancelled half-way: its disconnect callback would then fail
        on the cancelled future and leave the client hanging. So the connect runs shielded, and on
        cancellation it is given its own (bounded) time to finish, closed, and the cancellation
        goes on.
        """
        connect = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(connect)
        except asyncio.CancelledError:
            await asyncio.wait({connect}, timeout=_SETTLE_S)
            if connect.done() and not connect.cancelled() and connect.exception() is None:
                await self._disconnect(client)
            raise

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        """Say goodbye to the broker, but never hold a shutdown up for long.

        Not wait_for: a timeout would cancel aiomqtt's own wait on its disconnect future, which
        its disconnect callback then trips over. asyncio.wait leaves the goodbye running (aiomqtt
        bounds it by the client's timeout) and just stops waiting for it.
        """
        goodbye = asyncio.ensure_future(client.__aexit__(None, None, None))
        self._lingering.add(goodbye)
        goodbye.add_done_callback(self._lingering.discard)
        goodbye.add_done_callback(_consume_exception)
        await asyncio.wait({goodbye}, timeout=_SETTLE_S)


def _raise_if_cancelling() -> None:
    """Python 3.11's wait_for (inside aiomqtt) can swallow a cancellation that lands as its
    inner wait completes; a task that was asked to stop must stop all the same."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a helper task and wait for it, a bounded time, asking again if it lingers."""
    for _ in range(3):
        task.cancel()
        await asyncio.wait({task}, timeout=_SETTLE_S)
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: it was being stopped anyway
            return
    log.error("a helper task did not stop when asked", task=task.get_name())


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: a failed goodbye is of no interest
