"""Snapshots in parts over a real Mosquitto: staged as they come, swapped when all verified."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from conftest import Running, running, wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_sync_mqtt import _keyring, watching
from waiting import until_sync, until_value

from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store import open_database
from lockerd.timeutil import utcnow
from lockerd.trust.dsse import CODES_MANIFEST_PAYLOAD_TYPE, sign_envelope
from lockerd.trust.keys import generate_key
from lockerd.trust.parts import MIN_PART_BYTES, PartRef, PartWriter, build_manifest_payload
from sim.client import SimClient

pytestmark = pytest.mark.e2e

OLD = PlainCode("old-1", "482913", "3", parcel_id="PX1")
TOPICS = "lockers/L1/"


def plain_codes(n: int, *, start: int = 0) -> list[PlainCode]:
    return [PlainCode(f"p-{i}", str(10_000_000 + 7 * i), str(i % 8 + 1), parcel_id=f"PX{i}")
            for i in range(start, start + n)]


def make_parts(kit: BankKit, codes: list[PlainCode], *, version: int,
               signer: Ed25519PrivateKey | None = None) -> tuple[bytes, list[bytes]]:
    """A signed manifest and its parts, as lockerctl parts writes them."""
    writer = PartWriter(version=version, max_bytes=MIN_PART_BYTES)
    parts = [p for e in kit.entries(codes) if (p := writer.add(e)) is not None]
    if (last := writer.finish()) is not None:
        parts.append(last)
    now = utcnow()
    payload = build_manifest_payload(
        locker_id=kit.locker_id, version=version, issued_at=now,
        expires_at=now + timedelta(days=2), entries=len(codes),
        parts=[PartRef(sha256=hashlib.sha256(p).hexdigest(), size=len(p)) for p in parts])
    return sign_envelope(CODES_MANIFEST_PAYLOAD_TYPE, payload, [signer or kit.codes_key]), parts


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return make_kit([OLD], parcels=["3"], overrides={
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
                 "reconnect_max_s": 0.3, "keepalive_s": 5},
        "codes": {"bundle_file": "codes.json", "parts_idle_s": 0.3, "parts_timeout_s": 30.0}})


async def send(broker: Broker, manifest: bytes | None, parts: list[bytes],
               *, retain: bool = True) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        if manifest is not None:
            await client.publish(TOPICS + "codes/manifest", manifest, qos=1, retain=retain)
        for part in parts:
            await client.publish(TOPICS + "codes/part", part, qos=1)


def held(r: Running, code: PlainCode) -> bool:
    return r.app.codes.lookup(r.kit.digest(code.code)) is not None


def rejected(r: Running) -> list[dict[str, Any]]:
    return [dict(e.data) for e in r.events("cache.rejected")]


async def online(r: Running) -> None:
    assert r.app.link is not None
    await asyncio.wait_for(r.app.link.subscribed.wait(), 10)


async def test_parts_in_any_order_swap_once_all_are_staged(kit: BankKit, broker: Broker) -> None:
    codes = plain_codes(40)
    manifest, parts = make_parts(kit, codes, version=2)
    assert len(parts) >= 3
    async with running(kit) as r:
        await online(r)
        await send(broker, manifest, parts[::-1])
        await wait_until(lambda: r.app.codes.version() == 2, what="snapshot in parts applied")
        assert all(held(r, c) for c in codes) and not held(r, OLD)
        assert r.app.codes.count() == 40
        updated = r.events("cache.updated")[-1].data
        assert updated["version"] == 2 and updated["parts"] == len(parts)
        assert updated["upserted"] == 40 and not rejected(r)


async def test_a_missing_part_is_asked_for_and_the_old_set_stays_meanwhile(
        kit: BankKit, broker: Broker) -> None:
    codes = plain_codes(40)
    manifest, parts = make_parts(kit, codes, version=2)
    async with watching(broker) as w, running(kit) as r:
        await online(r)
        await send(broker, manifest, parts[:1] + parts[2:])

        def asked() -> bool:
            return any(b.get("parts") == {"version": 2, "missing": [[1, 1]]}
                       for b in w.on("sync/request"))
        await wait_until(asked, what="sync/request naming the missing part")
        assert r.app.codes.version() == 1 and held(r, OLD) and not held(r, codes[0])
        await send(broker, None, parts[1:2])
        await wait_until(lambda: r.app.codes.version() == 2, what="swap once it came")


async def test_a_part_with_a_wrong_hash_is_refused_and_the_right_one_still_counts(
        kit: BankKit, broker: Broker) -> None:
    manifest, parts = make_parts(kit, plain_codes(40), version=2)
    bad = bytearray(parts[0])
    bad[-1] ^= 1
    async with running(kit) as r:
        await online(r)
        await send(broker, manifest, [bytes(bad), *parts[1:]])
        await wait_until(lambda: any(d["reason"] == "hash_mismatch" for d in rejected(r)),
                         what="the forged part refused")
        assert r.app.codes.version() == 1 and held(r, OLD)
        await send(broker, None, parts[:1])
        await wait_until(lambda: r.app.codes.version() == 2, what="swap with the real part")


async def test_an_older_manifest_and_one_of_a_wrong_key_are_refused(
        kit: BankKit, broker: Broker) -> None:
    async with running(kit) as r:
        await online(r)
        manifest, parts = make_parts(kit, plain_codes(10), version=5)
        await send(broker, manifest, parts)
        await wait_until(lambda: r.app.codes.version() == 5, what="version 5 applied")
        older, older_parts = make_parts(kit, plain_codes(10, start=100), version=4)
        await send(broker, older, older_parts)
        forged, forged_parts = make_parts(kit, plain_codes(10, start=200), version=9,
                                          signer=generate_key())
        await send(broker, forged, forged_parts)
        await wait_until(lambda: {d["reason"] for d in rejected(r)} >= {"rollback", "signature"},
                         what="both manifests refused")
        assert all(d["what"] == "codes/manifest" for d in rejected(r))
        assert r.app.codes.version() == 5 and held(r, plain_codes(10)[3])
        # The version held, retained and delivered again at a reconnect, is no attack.
        before = len(rejected(r))
        await send(broker, manifest, [])
        await asyncio.sleep(0)
        await wait_until(lambda: r.app.codes.version() == 5)
        assert len(rejected(r)) == before


async def test_a_newer_manifest_supersedes_an_incomplete_one(
        kit: BankKit, broker: Broker) -> None:
    first, first_parts = make_parts(kit, plain_codes(40), version=2)
    second, second_parts = make_parts(kit, plain_codes(20, start=500), version=3)
    async with running(kit) as r:
        await online(r)
        await send(broker, first, first_parts[:2])
        parts = r.app.parts
        assert parts is not None
        await wait_until(lambda: parts.wanted() is not None, what="the first transfer open")
        await send(broker, second, second_parts)
        await wait_until(lambda: r.app.codes.version() == 3, what="the newer one applied")
        await send(broker, None, first_parts[2:])  # the rest of the old one: nothing
        assert r.app.codes.count() == 20 and held(r, plain_codes(1, start=500)[0])


async def test_a_transfer_without_its_parts_times_out_as_incomplete(
        make_kit: Callable[..., BankKit], broker: Broker) -> None:
    kit = make_kit([OLD], parcels=["3"], overrides={
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
                 "reconnect_max_s": 0.3},
        "codes": {"bundle_file": "codes.json", "parts_idle_s": 0.2, "parts_timeout_s": 0.5}})
    manifest, parts = make_parts(kit, plain_codes(40), version=2)
    async with running(kit) as r:
        await online(r)
        await send(broker, manifest, parts[:1])
        await wait_until(lambda: any(d["reason"] == "incomplete" for d in rejected(r)),
                         what="the transfer given up")
        assert r.app.codes.version() == 1 and held(r, OLD)


async def test_a_restart_mid_transfer_stages_again_what_it_asks_for(
        kit: BankKit, broker: Broker) -> None:
    codes = plain_codes(40)
    manifest, parts = make_parts(kit, codes, version=2)
    async with running(kit) as r:
        await online(r)
        await send(broker, manifest, parts[:2])
        await wait_until(lambda: r.app.parts is not None and r.app.parts.progress is not None
                         and len(r.app.parts.progress.received) == 2, what="two staged")
    async with watching(broker) as w, running(kit) as r:
        def asked() -> list[list[int]]:
            for body in w.on("sync/request"):
                if body.get("parts", {}).get("version") == 2:
                    return list(body["parts"]["missing"])
            return []
        await wait_until(lambda: bool(asked()), what="the restarted bank asking for parts")
        assert asked() == [[0, len(parts) - 1]]  # the retained manifest begins it again
        await send(broker, None, parts)
        await wait_until(lambda: r.app.codes.version() == 2, what="applied after the restart")
        assert all(held(r, c) for c in codes)


async def test_garbage_on_the_part_topic_is_refused_and_the_bank_carries_on(
        kit: BankKit, broker: Broker) -> None:
    async with running(kit) as r:
        await online(r)
        await send(broker, b"not a manifest", [b"", b"LKP1", b"\xff" * 40])
        await wait_until(lambda: len(rejected(r)) >= 3, what="refusals evented")
        assert {d["reason"] for d in rejected(r)} == {"malformed"}
        manifest, parts = make_parts(kit, plain_codes(5), version=2)
        await send(broker, manifest, parts)
        await wait_until(lambda: r.app.codes.version() == 2, what="a good one still applies")


def test_lockerctl_parts_and_publish_parts_to_lockerd_run(
        kit: BankKit, broker: Broker, tmp_path: Path) -> None:
    rows = ["id,code,kind,compartment,parcel_id"] + [
        f"{c.id},{c.code},pickup,{c.compartment},{c.parcel_id}" for c in plain_codes(3000)]
    (tmp_path / "codes.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "set"
    keys = kit.directory / "keys"
    assert lockerctl(["parts", "--locker", "L1", "--version", "7", "--code-key",
                      str(keys / "code_key"), "--codes", str(tmp_path / "codes.csv"),
                      "--not-after-in", "7d", "--expires-in", "2d", "--sign",
                      str(keys / "codes.key"), "--keyring", str(kit.keyring_path),
                      "--part-bytes", "32768", "-o", str(out)]) == 0
    assert len(list(out.glob("part-*.bin"))) >= 5
    proc = subprocess.Popen([sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c",
                             str(kit.config_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        until_sync(kit.socket_path.exists, 20, what="lockerd run up", interval=0.05)
        asyncio.run(asyncio.wait_for(bank_online(broker), 20))
        assert lockerctl(["publish-parts", "--broker", broker.address, "--locker", "L1",
                          str(out)]) == 0

        def version() -> int:
            db = open_database(kit.state_dir / "lockerd.db")
            try:
                return int(db.get_meta("codes_version") or 0)
            finally:
                db.close()
        until_sync(lambda: version() == 7, 60, what="3000 codes applied", interval=0.1)
        asyncio.run(_pickup(kit, plain_codes(3000)[2999]))
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def bank_online(broker: Broker) -> None:
    """Until the bank's retained state says online: it has subscribed by then."""
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(TOPICS + "state", qos=1)
        async for message in client.messages:
            if isinstance(message.payload, bytes) and b'"online"' in message.payload:
                return


async def _pickup(kit: BankKit, code: PlainCode) -> None:
    assert code.compartment is not None
    async with SimClient(kit.socket_path) as sim:
        await sim.parcel(code.compartment, True)
        await sim.press(code.code + "#")
        await until_value(sim.state, lambda s: s["compartments"][code.compartment]["door_open"],
                          5, what="the door of a code that came in parts open", interval=0.02)


async def test_parts_published_before_the_bank_came_are_served_again_on_request(
        kit: BankKit, broker: Broker, tmp_path: Path) -> None:
    rows = ["id,code,kind,compartment,parcel_id"] + [
        f"{c.id},{c.code},pickup,{c.compartment},{c.parcel_id}" for c in plain_codes(300)]
    (tmp_path / "codes.csv").write_text("\n".join(rows) + "\n")
    keys = kit.directory / "keys"
    out = tmp_path / "set"
    assert lockerctl(["parts", "--locker", "L1", "--version", "4", "--code-key",
                      str(keys / "code_key"), "--codes", str(tmp_path / "codes.csv"),
                      "--not-after-in", "7d", "--expires-in", "2d", "--sign",
                      str(keys / "codes.key"), "--part-bytes", "4096", "-o", str(out)]) == 0
    # No session of the bank yet: the broker keeps the retained manifest, drops the parts.
    serving = asyncio.create_task(asyncio.to_thread(lockerctl, [
        "publish-parts", "--broker", broker.address, "--locker", "L1", "--serve", "6",
        str(out)]))
    async with watching(broker) as w:
        await wait_until(lambda: len(w.messages) > 0, what="the manifest published")
    async with running(kit) as r:
        await wait_until(lambda: r.app.codes.version() == 4, timeout=10,
                         what="parts served again on the bank's request")
        assert held(r, plain_codes(300)[299])
    assert await serving == 0


async def test_a_snapshot_bundle_applied_mid_transfer_has_the_parts_staged_again(
        kit: BankKit, broker: Broker) -> None:
    codes = plain_codes(40)
    manifest, parts = make_parts(kit, codes, version=5)
    async with watching(broker) as w, running(kit) as r:
        await online(r)
        await send(broker, manifest, parts[:2])
        await wait_until(lambda: r.app.parts is not None and r.app.parts.progress is not None
                         and len(r.app.parts.progress.received) == 2, what="two staged")
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.publish(TOPICS + "codes", kit.bundle([OLD], version=3), qos=1)
        await wait_until(lambda: r.app.codes.version() == 3, what="the bundle applied")
        await send(broker, None, parts[2:3])

        def asked_all() -> bool:
            return any(b.get("parts") == {"version": 5, "missing": [[0, len(parts) - 1]]}
                       for b in w.on("sync/request"))
        await wait_until(asked_all, what="every part asked for again")
        await send(broker, None, parts)
        await wait_until(lambda: r.app.codes.version() == 5, what="the parts applied after all")
        assert all(held(r, c) for c in codes) and not held(r, OLD)


async def test_after_a_codes_key_rotation_a_manifest_of_a_lower_version_sets_the_floor(
        kit: BankKit, broker: Broker) -> None:
    fresh = generate_key()
    async with running(kit) as r:
        await online(r)
        manifest, parts = make_parts(kit, plain_codes(10), version=50)
        await send(broker, manifest, parts)
        await wait_until(lambda: r.app.codes.version() == 50, what="version 50 applied")
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.publish(TOPICS + "keyring", _keyring(
                kit, version=2, root=[kit.root_key], signers=[kit.root_key],
                codes_keys=[fresh]), qos=1, retain=True)
        await r.wait_event("codes.floor_reset")
        lower, lower_parts = make_parts(kit, plain_codes(10, start=300), version=3, signer=fresh)
        await send(broker, lower, lower_parts)
        await wait_until(lambda: r.app.codes.version() == 3, what="the lower snapshot applied")
        updated = r.events("cache.updated")[-1].data
        assert updated["floor_reset"] is True and updated["previous_version"] == 50
        assert not r.app.codes.floor_reset_pending()
        assert held(r, plain_codes(1, start=300)[0]) and not held(r, plain_codes(1)[0])


async def test_after_a_broker_outage_the_bank_names_the_missing_parts_and_gets_them(
        kit: BankKit, broker: Broker) -> None:
    manifest, parts = make_parts(kit, plain_codes(40), version=2)
    async with running(kit) as r:
        await online(r)
        await send(broker, manifest, parts[:1])
        await wait_until(lambda: r.app.parts is not None and r.app.parts.progress is not None
                         and len(r.app.parts.progress.received) == 1, what="one staged")
        broker.stop()
        link = r.app.link
        assert link is not None
        await wait_until(lambda: not link.connected.is_set(), what="link down")
        broker.start()
        async with watching(broker) as w:
            def asked() -> bool:
                return any(b.get("parts") == {"version": 2, "missing": [[1, len(parts) - 1]]}
                           for b in w.on("sync/request"))
            await wait_until(asked, timeout=10, what="a sync/request naming the parts")
            await send(broker, None, parts[1:])
            await wait_until(lambda: r.app.codes.version() == 2, what="applied after it")


async def test_a_manifest_of_no_codes_empties_the_set_at_once(kit: BankKit,
                                                              broker: Broker) -> None:
    manifest, parts = make_parts(kit, [], version=2)
    assert parts == []
    async with running(kit) as r:
        await online(r)
        await send(broker, manifest, [])
        await wait_until(lambda: r.app.codes.version() == 2, what="the empty snapshot applied")
        assert r.app.codes.count() == 0 and not held(r, OLD)
