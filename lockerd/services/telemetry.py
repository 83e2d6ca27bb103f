"""Heartbeat telemetry on MQTT (QoS 0): uptime, outbox depth, versions, hardware health."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from lockerd.logs import get_logger
from lockerd.mqtt import Topics
from lockerd.services.link import MqttLink, NotConnected

log = get_logger("lockerd.telemetry")


class TelemetryService:
    def __init__(self, *, link: MqttLink, topics: Topics, interval_s: float,
                 snapshot: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._link = link
        self._topics = topics
        self._interval = interval_s
        self._snapshot = snapshot
        link.on_connect(self.send)

    async def send(self) -> None:
        # Telemetry is a heartbeat: a lost one is replaced by the next.
        with contextlib.suppress(NotConnected):
            await self._link.publish_json(self._topics.telemetry, await self._snapshot(), qos=0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._link.connected.is_set():
                await self.send()
