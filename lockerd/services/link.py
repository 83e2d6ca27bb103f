"""The bank's one MQTT session: connect, reconnect forever, dispatch messages, publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiomqtt

from lockerd.core.backoff import Backoff
from lockerd.logs import get_logger
from lockerd.mqtt import BrokerSettings

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
    extra: dict[str, Any] = field(default_factory=dict)


class MqttLink:
    """A persistent session (clean_session false, fixed client id) that comes back by itself.

    Other services register topic handlers and on-connect callbacks before `run`, and
    publish through `publish`, which fails fast with NotConnected while the link is down.
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
        self._max_payload = max_payload_bytes
        self._backoff = backoff
        self._now = now
        self._on_too_large = on_too_large
        self._handlers: dict[str, Handler] = {}
        self._on_connect: list[OnConnect] = []
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.status = LinkStatus(broker=f"{broker.host}:{broker.port}")

    def handle(self, topic: str, handler: Handler) -> None:
        self._handlers[topic] = handler

    def on_connect(self, callback: OnConnect) -> None:
        self._on_connect.append(callback)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnected(f"not connected to {self.status.broker}")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise NotConnected(str(exc)) from exc

    async def publish_json(self, topic: str, body: Any, **kwargs: Any) -> None:
        await self.publish(topic, json.dumps(body, separators=(",", ":")), **kwargs)

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self._lost(str(exc))
            delay = self._backoff.next()
            log.info("reconnecting to the broker", broker=self.status.broker,
                     delay_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        client = self._broker.client(clean_session=False, will=self._will)
        await _connect(client)
        try:
            self._client = client
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
            inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
            worker = asyncio.create_task(self._work(inbox), name="mqtt.handlers")
            try:
                for topic in self._handlers:
                    await client.subscribe(topic, qos=1)
                async for message in client.messages:
                    inbox.put_nowait(message)
            finally:
                self._client = None
                self.connected.clear()
                self.status.connected = False
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
        finally:
            await _disconnect(client)

    async def _work(self, inbox: asyncio.Queue[aiomqtt.Message]) -> None:
        for callback in self._on_connect:
            await self._guarded(callback(), what="on-connect callback")
        while True:
            message = await inbox.get()
            await self._guarded(self._dispatch(message), what=f"handler of {message.topic}")

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
        payload = message.payload
        size = len(payload) if isinstance(payload, bytes | bytearray | str) else 0
        if size > self._max_payload:
            # Refused before any parsing: a huge payload must not cost more than its receipt.
            self.status.refused_too_large += 1
            log.warning("payload over the configured limit; refused", topic=topic, size=size,
                        limit=self._max_payload)
            if self._on_too_large is not None:
                await self._on_too_large(topic, size)
            return
        await handler(message)


async def _connect(client: aiomqtt.Client) -> None:
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
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connect, _SETTLE_S)
            await _disconnect(client)
        raise


async def _disconnect(client: aiomqtt.Client) -> None:
    """Say goodbye to the broker, but never hold a shutdown up for long."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.__aexit__(None, None, None), _SETTLE_S)
