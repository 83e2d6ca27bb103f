"""Code sync over a real Mosquitto: keyrings and bundles published with lockerctl, attacks
refused, outages survived, hostile payloads ignored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from conftest import Running, running, wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import BankKit, PlainCode
from lockerd.timeutil import utcnow
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    RoleKeys,
    parse_envelope,
    sign_envelope,
)
from lockerd.trust.keyring import ROLE_NAMES, build_keyring_payload
from lockerd.trust.keys import generate_key

pytestmark = pytest.mark.e2e

CODE, OTHER = "482913", "650017"


def mqtt_overrides(broker: Broker, **extra: Any) -> dict[str, Any]:
    return {"mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
                     "reconnect_max_s": 0.3, "keepalive_s": 5, **extra}}


def codes() -> list[PlainCode]:
    return [PlainCode("p-1", CODE, "3", parcel_id="PX1"),
            PlainCode("p-2", OTHER, "4", parcel_id="PX2")]


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return make_kit(codes(), parcels=["3", "4"], import_files=False,
                    overrides=mqtt_overrides(broker, max_payload_bytes=64 * 1024))


async def publish(kit: BankKit, broker: Broker, data: bytes, name: str) -> None:
    """Publish a signed file with lockerctl, as a backend would."""
    path = kit.directory / name
    path.write_bytes(data)
    status = await asyncio.to_thread(
        lockerctl, ["publish", "--broker", broker.address, "--locker", kit.locker_id, str(path)])
    assert status == 0


async def raw_publish(broker: Broker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


class Watcher:
    """A backend-side subscriber that records every message under the bank's prefix."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []

    def on(self, suffix: str) -> list[Any]:
        return [json.loads(p) for t, p, _ in self.messages if t.endswith("/" + suffix)]


@asynccontextmanager
async def watching(broker: Broker, prefix: str = "lockers/L1/", *,
                   client_id: str | None = None) -> AsyncIterator[Watcher]:
    """With `client_id`, a persistent session: on a broker with persistence, what was
    published while the watcher was away is delivered when it comes back."""
    watcher = Watcher()
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id,
                              clean_session=False if client_id else None) as client:
        await client.subscribe(prefix + "#", qos=1)

        async def pump() -> None:
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                watcher.messages.append((str(m.topic), payload, m.retain))

        task = asyncio.create_task(pump())
        try:
            yield watcher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def synced(kit: BankKit, broker: Broker, r: Running, *, version: int = 5) -> None:
    await publish(kit, broker, kit.keyring(version=1), "keyring.json")
    await publish(kit, broker, kit.bundle(codes(), version=version), "snapshot.json")
    await wait_until(lambda: r.app.codes.version() == version, what="snapshot applied")


async def test_snapshot_then_pickup_then_delta_revokes(kit: BankKit, broker: Broker) -> None:
    async with watching(broker) as w, running(kit) as r:
        await wait_until(lambda: bool(w.on("sync/request")), what="sync/request on connect")
        assert w.on("sync/request")[0] == {"codes_version": 0, "keyring_version": 0}
        await synced(kit, broker, r)
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")
        r.world.close_door("3")  # parcel still inside: the use is given back
        await r.wait_event("pickup.incomplete")
        await publish(kit, broker, kit.bundle([], version=6, base_version=5, revoke=["p-1"]),
                      "delta.json")
        await wait_until(lambda: r.app.codes.version() == 6, what="delta applied")
        r.world.press(CODE + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "unknown_code"
        # The state document follows the versions, retained.
        await wait_until(lambda: any(s.get("codes_version") == 6 for s in w.on("state")),
                         what="state with codes_version 6")
        # A late subscriber gets it too: the state is retained (the flag is only set on
        # messages delivered because of a new subscription).
        async with watching(broker) as late:
            await wait_until(lambda: bool(late.on("state")), what="retained state")
            assert late.on("state")[-1]["codes_version"] == 6
            assert [retain for t, _, retain in late.messages if t.endswith("/state")] == [True]


def _dup_signature(envelope: bytes) -> bytes:
    doc = json.loads(envelope)
    doc["signatures"] = doc["signatures"] * 2
    return json.dumps(doc).encode()


def _keyring(kit: BankKit, *, version: int, root: list[Any], signers: list[Any],
             codes_keys: list[Any] | None = None, codes_threshold: int = 1,
             expires_in: timedelta = timedelta(days=30)) -> bytes:
    now = utcnow()
    roles = {name: RoleKeys.from_keys([k.public_key() for k in root], 1) for name in ROLE_NAMES}
    roles["codes"] = RoleKeys.from_keys(
        [k.public_key() for k in (codes_keys or [kit.codes_key])], codes_threshold)
    payload = build_keyring_payload(version=version, issued_at=now - timedelta(minutes=1),
                                    expires_at=now + expires_in, roles=roles)
    return sign_envelope(KEYRING_PAYLOAD_TYPE, payload, signers)


ATTACKS: dict[str, tuple[str, Callable[[BankKit], bytes]]] = {
    "rollback": ("rollback", lambda k: k.bundle(codes(), version=4)),
    "expired bundle": ("expired", lambda k: k.bundle(
        codes(), version=6, expires_at=utcnow() - timedelta(seconds=1))),
    "expired keyring": ("expired", lambda k: _keyring(
        k, version=2, root=[k.root_key], signers=[k.root_key],
        expires_in=-timedelta(seconds=1))),
    "wrong locker": ("wrong_locker", lambda k: k.bundle(codes(), version=6, locker_id="L2")),
    "mix and match": ("gap", lambda k: k.bundle(codes(), version=7, base_version=3)),
    "another role's key": ("signature", lambda k: k.bundle(codes(), version=6,
                                                           signer=k.root_key)),
    "root rotation signed only by the new root": ("signature", lambda k: _keyring(
        k, version=2, root=[NEW_ROOT], signers=[NEW_ROOT])),
}
NEW_ROOT: Ed25519PrivateKey = generate_key()


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attacks_are_refused_and_change_nothing(
    kit: BankKit, broker: Broker, attack: str
) -> None:
    reason, make = ATTACKS[attack]
    async with watching(broker) as w, running(kit) as r:
        await synced(kit, broker, r)
        requests_before = len(w.on("sync/request"))
        await publish(kit, broker, make(kit), "attack.json")
        ev = await r.wait_event("cache.rejected")
        assert ev.data["reason"] == reason
        assert (r.app.codes.version(), r.app.cache.keyring_version) == (5, 1)
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")  # the codes held stay in force
        if reason == "gap":
            await wait_until(lambda: len(w.on("sync/request")) > requests_before,
                             what="a resync request after the gap")


async def test_a_duplicated_signature_does_not_count_twice(kit: BankKit, broker: Broker) -> None:
    second = generate_key()
    async with running(kit) as r:
        await synced(kit, broker, r)
        # The codes role now needs two distinct signers.
        await publish(kit, broker, _keyring(kit, version=2, root=[kit.root_key],
                                            signers=[kit.root_key],
                                            codes_keys=[kit.codes_key, second],
                                            codes_threshold=2), "keyring2.json")
        await wait_until(lambda: r.app.cache.keyring_version == 2, what="keyring 2")
        await publish(kit, broker, _dup_signature(kit.bundle(codes(), version=6)), "dup.json")
        ev = await r.wait_event("cache.rejected")
        assert ev.data["reason"] == "signature"
        assert r.app.codes.version() == 5
        # Signed by both distinct keys, the same bundle is accepted.
        payload = parse_envelope(kit.bundle(codes(), version=6)).payload
        both = sign_envelope(CODES_PAYLOAD_TYPE, payload, [kit.codes_key, second])
        await publish(kit, broker, both, "both.json")
        await wait_until(lambda: r.app.codes.version() == 6, what="bundle signed by two keys")


async def test_root_rotation_signed_by_old_and_new_roots_is_accepted(
    kit: BankKit, broker: Broker
) -> None:
    async with running(kit) as r:
        await synced(kit, broker, r)
        await publish(kit, broker, _keyring(kit, version=2, root=[NEW_ROOT],
                                            signers=[kit.root_key, NEW_ROOT]), "rot.json")
        await wait_until(lambda: r.app.cache.keyring_version == 2, what="rotated keyring")
        # The old root alone can no longer sign a keyring.
        await publish(kit, broker, _keyring(kit, version=3, root=[kit.root_key],
                                            signers=[kit.root_key]), "old.json")
        ev = await r.wait_event("cache.rejected")
        assert ev.data["reason"] == "signature"
    async with running(kit) as r2:
        assert r2.app.cache.keyring_version == 2, "the rotated keyring survives a restart"


@pytest.fixture
def persistent_broker(bank_dir: Path) -> Iterator[Broker]:
    """A Mosquitto that keeps sessions (and retained messages) across a stop and start."""
    d = bank_dir / "pbroker"
    d.mkdir()
    b = Broker(d, persistence=True)
    b.start()
    yield b
    b.stop()


async def test_broker_outage_codes_keep_working_then_resync(
    make_kit: Callable[..., BankKit], persistent_broker: Broker
) -> None:
    broker = persistent_broker
    kit = make_kit(codes(), parcels=["3", "4"], import_files=False,
                   overrides=mqtt_overrides(broker))
    async with running(kit) as r:
        await synced(kit, broker, r)
        assert r.app.link is not None
        # The backend's persistent session, made before the outage: whatever the bank
        # publishes after the restart is queued for it, however soon the bank reconnects.
        async with watching(broker, client_id="backend-watch"):
            pass
        broker.stop()
        await wait_until(lambda: not r.app.link.status.connected, what="link down")  # type: ignore[union-attr]
        r.world.press(CODE + "#")  # offline validation
        await r.wait_event("pickup.opened")
        broker.start()
        async with watching(broker, client_id="backend-watch") as w:
            await wait_until(lambda: bool(w.on("sync/request")), timeout=10,
                             what="sync/request after reconnect")
            # Before the outage the bank asked only with codes_version 0 (on connect, and on
            # the keyring's new codes keys): a 5 is the request of the reconnect.
            assert w.on("sync/request")[-1]["codes_version"] == 5
            assert r.app.link.status.connects >= 2
            await publish(kit, broker, kit.bundle([], version=6, base_version=5,
                                                  revoke=["p-2"]), "delta.json")
            await wait_until(lambda: r.app.codes.version() == 6, what="delta after outage")
        r.world.press(OTHER + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "unknown_code"


HOSTILE = {
    "malformed json": b'{"payloadType": ',
    "wrong types": json.dumps({"payloadType": 5, "payload": [], "signatures": {}}).encode(),
    "random bytes": os.urandom(512),
    "empty": b"",
    "json array": b"[1, 2, 3]",
    # Over [mqtt] max_payload_bytes (64 KiB here) but within the packet size the daemon
    # announces: the broker sends it, and the daemon refuses it at receipt.
    "huge": b"{" + b" " * (64 * 1024 + 100) + b"}",
}


@pytest.mark.parametrize("topic", ["keyring", "codes"])
async def test_hostile_payloads_are_refused_and_the_daemon_stays_up(
    kit: BankKit, broker: Broker, topic: str
) -> None:
    async with running(kit) as r:
        await synced(kit, broker, r)
        for name, payload in HOSTILE.items():
            before = len(r.events("cache.rejected"))
            await raw_publish(broker, f"lockers/L1/{topic}", payload)
            await r.wait_event("cache.rejected", count=before + 1)
            last = r.events("cache.rejected")[-1]
            expected = "too_large" if name == "huge" else "malformed"
            assert last.data["reason"] == expected, (name, last.data)
        # Topics the bank does not handle, and the daemon's own output topics, change nothing.
        await raw_publish(broker, "lockers/L1/sync/request", os.urandom(64))
        await raw_publish(broker, "lockers/L1/state", b"garbage")
        assert (r.app.codes.version(), r.app.cache.keyring_version) == (5, 1)
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")


async def test_the_broker_never_sends_a_packet_over_the_announced_maximum(
    kit: BankKit, broker: Broker
) -> None:
    async with running(kit) as r:
        await synced(kit, broker, r)
        assert r.app.link is not None
        status = r.app.link.status
        received, refused = status.received, status.refused_too_large
        # Far over max_payload_bytes + PACKET_OVERHEAD: the broker drops it for this client
        # (MQTT 5 Maximum Packet Size), so it is never even read off the socket.
        await raw_publish(broker, "lockers/L1/codes", b"{" + b" " * (200 * 1024) + b"}")
        await raw_publish(broker, "lockers/L1/codes", b"[]")  # a small marker behind it
        ev = await r.wait_event("cache.rejected")
        assert ev.data["reason"] == "malformed"
        assert (status.received, status.refused_too_large) == (received + 1, refused)
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")


async def test_a_flood_on_cmd_stays_within_the_inbox_and_every_message_is_answered(
    kit: BankKit, broker: Broker
) -> None:
    """More QoS 1 messages than the inbox holds, as fast as the broker takes them: the queue
    stays capped, and what it could not take the broker delivers again after a reconnect."""
    from lockerd.services.inbox import QOS1_CAP

    count = 120
    async with watching(broker) as w, running(kit) as r:
        await synced(kit, broker, r)
        assert r.app.link is not None
        async with aiomqtt.Client(broker.host, broker.port, max_inflight_messages=count) as c:
            await asyncio.gather(*(c.publish("lockers/L1/cmd", b"\x00" * 32 * 1024, qos=1)
                                   for _ in range(count)))
        await wait_until(lambda: len(w.on("cmd/result")) >= count, timeout=60,
                         what=f"{count} answers on cmd/result")
        assert {(x["status"], x["detail"]) for x in w.on("cmd/result")} == {
            ("rejected", "malformed")}
        status = r.app.link.status
        assert 0 < status.inbox_peak <= QOS1_CAP
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")


async def test_state_is_retained_and_the_will_says_offline(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    kit = make_kit([], overrides=mqtt_overrides(broker))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path),
        stderr=asyncio.subprocess.DEVNULL)
    try:
        async with watching(broker) as w:
            await wait_until(lambda: any(s.get("status") == "online" for s in w.on("state")),
                             timeout=15, what="online state")
            online = w.on("state")[-1]
            assert online["codes_version"] == 1 and online["keyring_version"] == 1
            assert set(online["compartments"]) == {str(i) for i in range(1, 9)}
            proc.send_signal(signal.SIGKILL)  # no clean goodbye: the broker sends the will
            await asyncio.wait_for(proc.wait(), 10)
            await wait_until(lambda: w.on("state")[-1] == {"status": "offline"}, timeout=20,
                             what="the will")
        # A late subscriber sees the retained offline state.
        async with watching(broker) as late:
            await wait_until(lambda: bool(late.on("state")), what="retained state")
            assert late.on("state")[-1] == {"status": "offline"}
            assert any(retain for _, _, retain in late.messages)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_clean_stop_leaves_the_state_offline_and_reports_stopping(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    """A clean DISCONNECT discards the will: the daemon says offline itself, after its last
    event has reached the broker."""
    kit = make_kit([], overrides=mqtt_overrides(broker))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path),
        stderr=asyncio.subprocess.DEVNULL)
    try:
        async with watching(broker) as w:
            await wait_until(lambda: any(s.get("status") == "online" for s in w.on("state")),
                             timeout=15, what="online state")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            await wait_until(lambda: w.on("state")[-1] == {"status": "offline"},
                             what="offline state before the disconnect")
            await wait_until(lambda: any(e["type"] == "daemon.stopping" for e in w.on("events")),
                             what="daemon.stopping received")
            stopping = next(e for e in w.on("events") if e["type"] == "daemon.stopping")
            assert stopping["seq"] == max(e["seq"] for e in w.on("events"))
        async with watching(broker) as late:
            await wait_until(lambda: bool(late.on("state")), what="retained state")
            assert late.on("state") == [{"status": "offline"}]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_apps_own_stop_says_offline_too(kit: BankKit, broker: Broker) -> None:
    async with watching(broker) as w:
        async with running(kit) as r:
            assert r.app.link is not None
            await asyncio.wait_for(r.app.link.subscribed.wait(), 10)
            await wait_until(lambda: any(s.get("status") == "online" for s in w.on("state")),
                             what="online state")
        # running() has returned: the app's stop ran to the end.
        await wait_until(lambda: w.on("state")[-1] == {"status": "offline"},
                         what="offline state")
        await wait_until(lambda: "daemon.stopping" in [e["type"] for e in w.on("events")],
                         what="daemon.stopping received")
