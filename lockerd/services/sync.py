"""Code cache sync over MQTT: keyrings and code bundles in, sync requests and state out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import aiomqtt

from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.mqtt import Topics
from lockerd.services.cache import CodeCache
from lockerd.services.link import MqttLink, NotConnected

log = get_logger("lockerd.sync")
# Over this, one message held the event loop for tens of milliseconds while paho read it
# (docs/benchmarks.md, loop_lag.py): such a snapshot should come in parts.
ONE_MESSAGE_ADVISED_BYTES = 2 << 20


def payload_buffer(message: aiomqtt.Message) -> bytes | bytearray:
    """The payload as it was read, not copied: the daemon's client (lockerd.mqtt.bound_reads)
    hands a payload on as the bytearray it was read into, and a copy of a big one is a stall
    of the loop."""
    payload = message.payload
    if isinstance(payload, bytearray):
        return payload
    return payload_bytes(message)


def payload_bytes(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return b"" if payload is None else str(payload).encode("ascii")


class SyncService:
    """Keeps the code cache in step with the backend while the link is up.

    The cache does the verifying and eventing; this service only moves bytes, asks for a
    resync on connect and on a gap, and keeps the retained `state` current.
    """

    def __init__(
        self,
        *,
        link: MqttLink,
        topics: Topics,
        cache: CodeCache,
        state: Callable[[], dict[str, Any]],
    ) -> None:
        self._link = link
        self._topics = topics
        self._cache = cache
        self._state = state
        self._reports: dict[str, Callable[[], Any]] = {}
        link.handle(topics.keyring, self._on_keyring)
        link.handle(topics.codes, self._on_codes)
        link.on_connect(self._on_connect)

    async def _on_connect(self) -> None:
        await self.publish_state()
        await self.request_sync("connect")

    def report(self, key: str, provider: Callable[[], Any]) -> None:
        """Add `key` to every sync/request while `provider` gives something other than None
        (the snapshot in parts under way names the parts it misses)."""
        self._reports[key] = provider

    async def request_sync(self, why: str) -> None:
        body: dict[str, Any] = {"codes_version": self._cache.codes_version,
                                "keyring_version": self._cache.keyring_version}
        for key, provider in self._reports.items():
            if (value := provider()) is not None:
                body[key] = value
        try:
            await self._link.publish_json(self._topics.sync_request, body, qos=1)
            log.info("sync requested", why=why, **body)
        except NotConnected as exc:
            log.info("sync request not sent; the link is down", why=why, error=str(exc))

    async def publish_state(self) -> None:
        # While the link is down there is nobody to tell; the next connect sends it again.
        with contextlib.suppress(NotConnected):
            await self._link.publish_json(self._topics.state, self._state(), qos=1, retain=True)

    async def _on_keyring(self, message: aiomqtt.Message) -> None:
        try:
            self._cache.load_keyring(payload_bytes(message), source="mqtt")
        except TrustError:
            return  # logged and evented by the cache; nothing changed
        await self.publish_state()
        if self._cache.codes_floor_reset:
            # New codes keys: ask for the full snapshot that sets the new version floor.
            await self.request_sync("codes_floor_reset")

    async def _on_codes(self, message: aiomqtt.Message) -> None:
        raw = payload_buffer(message)
        if len(raw) > ONE_MESSAGE_ADVISED_BYTES:
            log.warning("codes bundle of this size sent as one MQTT message: reading it held "
                        "the event loop; send a snapshot over 2 MiB in parts (lockerctl parts)",
                        size=len(raw))
        try:
            await self._cache.load_bundle_off_loop(raw, source="mqtt")
        except TrustError as exc:
            if exc.reason in ("gap", "no_keyring"):
                await self.request_sync(exc.reason)
            return
        await self.publish_state()
