"""Big applies in an apply process: over MQTT, from the bundle file and in parts; the same
refusals as in the daemon, and a process killed or stopped mid-fill leaves the codes held."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from broker import Broker
from conftest import Running, running, wait_until
from test_parts_e2e import make_parts, send
from test_sync_mqtt import mqtt_overrides, publish
from waiting import until_sync

from lockerd.config import load_config
from lockerd.dev.provision import BankKit, PlainCode
from lockerd.errors import TrustError
from lockerd.services.banksetup import build_cache
from lockerd.services.cache import CHILD_MIN_BYTES, CodeCache
from lockerd.store import CodeStore, EventLog, open_database
from lockerd.store.staging import STAGING_TABLE
from lockerd.trust.dsse import CODES_PAYLOAD_TYPE, parse_envelope, sign_envelope
from lockerd.trust.keys import generate_key

pytestmark = pytest.mark.e2e

OLD = PlainCode("old-1", "482913", "3", parcel_id="PX1")
BIG = 1500  # codes: a snapshot of about 440 KB, over CHILD_MIN_BYTES


def plain(n: int, *, start: int = 0) -> list[PlainCode]:
    return [PlainCode(f"p-{i}", str(10_000_000 + 7 * i), str(i % 8 + 1), parcel_id=f"PX{i}")
            for i in range(start, start + n)]


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return make_kit([OLD], parcels=["3"], overrides={
        **mqtt_overrides(broker, max_payload_bytes=8 << 20),
        "codes": {"parts_idle_s": 0.3, "parts_timeout_s": 30.0}})


def rejected(r: Running) -> list[dict[str, object]]:
    return [dict(e.data) for e in r.events("cache.rejected")]


async def online(r: Running) -> None:
    assert r.app.link is not None
    await asyncio.wait_for(r.app.link.subscribed.wait(), 10)


def applied_version(r: Running) -> int | None:
    """The version the cache last reported applied (after its apply process answered)."""
    applied = r.app.cache.last_applied
    return None if applied is None else applied.version


async def pickup_still_works(r: Running) -> None:
    r.world.press(OLD.code + "#")
    await r.wait_event("pickup.opened")


async def test_a_big_snapshot_over_mqtt_is_applied_by_an_apply_process(
        kit: BankKit, broker: Broker) -> None:
    codes = plain(BIG)
    snapshot = kit.bundle(codes, version=2)
    assert len(snapshot) >= CHILD_MIN_BYTES
    async with running(kit) as r:
        await online(r)
        await publish(kit, broker, snapshot, "big.json")
        await wait_until(lambda: applied_version(r) == 2, timeout=60, what="applied")
        applied = r.app.cache.last_applied
        assert applied is not None and applied.pid not in (None, os.getpid())
        assert (applied.version, applied.upserted) == (2, BIG)
        updated = r.events("cache.updated")[-1].data
        assert (updated["version"], updated["upserted"], updated["source"]) == (2, BIG, "mqtt")
        assert r.app.codes.count() == BIG
        assert r.app.codes.lookup(kit.digest(codes[-1].code)) is not None
        assert r.app.codes.lookup(kit.digest(OLD.code)) is None
        assert not rejected(r)


async def test_a_small_delta_stays_in_a_thread(kit: BankKit, broker: Broker) -> None:
    async with running(kit) as r:
        await online(r)
        await publish(kit, broker, kit.bundle(plain(3), version=2, base_version=1), "d.json")
        await wait_until(lambda: applied_version(r) == 2, what="delta applied")
        applied = r.app.cache.last_applied
        assert applied is not None and applied.pid is None and applied.base_version == 1


def _garbled(kit: BankKit) -> bytes:
    # A valid signature over a payload that is no codes bundle.
    return sign_envelope(CODES_PAYLOAD_TYPE, b'{"type": "codes", "upsert": "' +
                         b"x" * CHILD_MIN_BYTES + b'"}', [kit.codes_key])


BAD: dict[str, Callable[[BankKit], bytes]] = {
    "malformed": _garbled,
    "signature": lambda kit: kit.bundle(plain(BIG), version=2, signer=generate_key()),
    "wrong_locker": lambda kit: _retargeted(kit),
    "rollback": lambda kit: kit.bundle(plain(BIG), version=0),
}


def _retargeted(kit: BankKit) -> bytes:
    raw = kit.bundle(plain(BIG), version=2)
    payload = parse_envelope(raw).payload.replace(
        f'"locker_id":"{kit.locker_id}"'.encode(), b'"locker_id":"L2"')
    return sign_envelope(CODES_PAYLOAD_TYPE, payload, [kit.codes_key])


@pytest.mark.parametrize("reason", list(BAD))
async def test_a_big_bundle_refused_in_the_apply_process_is_refused_as_before(
        kit: BankKit, broker: Broker, reason: str) -> None:
    raw = BAD[reason](kit)
    assert len(raw) >= CHILD_MIN_BYTES
    async with running(kit) as r:
        await online(r)
        await publish(kit, broker, raw, "bad.json")
        event = await r.wait_event("cache.rejected", timeout=60)
        assert event.data["reason"] == reason and event.data["what"] == "codes"
        assert (r.app.codes.version(), r.app.codes.count()) == (1, 1)
        await pickup_still_works(r)


def staged_rows(kit: BankKit) -> int:
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        if db.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                           (STAGING_TABLE,)).fetchone() is None:
            return 0
        return int(db.conn.execute(f"SELECT COUNT(*) FROM {STAGING_TABLE}").fetchone()[0])
    finally:
        db.close()


async def test_an_apply_process_killed_mid_fill_leaves_the_old_set_and_the_daemon_serving(
        kit: BankKit) -> None:
    raw = kit.bundle(plain(30_000), version=2)
    async with running(kit) as r:
        apply = asyncio.create_task(r.app.cache.load_bundle_off_loop(raw, source="test"))
        await wait_until(lambda: staged_rows(kit) > 0 or apply.done(), timeout=60,
                         what="rows staged")
        pid = r.app.cache.apply_process_pid
        assert pid is not None and not apply.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TrustError) as refused:
            await apply
        assert refused.value.reason == "apply_failed"
        event = (await r.wait_event("cache.rejected")).data
        assert event["reason"] == "apply_failed" and "status -9" in str(event["detail"])
        assert (r.app.codes.version(), r.app.codes.count()) == (1, 1)
        await pickup_still_works(r)
        # The next apply drops the leftovers and swaps in.
        applied = await r.app.cache.load_bundle_off_loop(raw, source="test")
        assert applied.version == 2 and r.app.codes.count() == 30_000
        assert staged_rows(kit) == 0


async def test_an_apply_process_that_stops_answering_is_killed(kit: BankKit) -> None:
    config = load_config(kit.config_path)
    db = open_database(kit.state_dir / "lockerd.db")
    cache = build_cache(config, db=db)
    cache.load_keyring(kit.keyring_path.read_bytes(), source="test")
    cache.load_bundle(kit.bundle_path.read_bytes(), source="test")
    silent = CodeCache(db=db, codes=CodeStore(db), events=EventLog(db), locker_id=kit.locker_id,
                       pinned_root=cache.trusted_root, now=lambda: datetime.now(UTC),
                       monotonic=asyncio.get_running_loop().time, apply_silence_s=1.0)
    try:
        assert silent.keyring is not None
        apply = asyncio.create_task(silent.load_bundle_off_loop(
            kit.bundle(plain(BIG), version=2), source="test"))
        await wait_until(lambda: silent.apply_process_pid is not None, what="a process")
        pid = silent.apply_process_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # hung: it says nothing more
        with pytest.raises(TrustError) as refused:
            await asyncio.wait_for(apply, 30)
        assert refused.value.reason == "apply_failed"
        assert "did not go on for 1 s" in str(refused.value)
        assert CodeStore(db).version() == 1
        rejected = EventLog(db).recent(type_prefix="cache.rejected")
        assert rejected[-1].data["reason"] == "apply_failed"
    finally:
        db.close()


async def test_a_big_bundle_file_is_applied_by_an_apply_process(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit(plain(BIG))
    assert kit.bundle_path.stat().st_size >= CHILD_MIN_BYTES
    async with running(kit) as r:
        applied = r.app.cache.last_applied
        assert applied is not None and applied.pid not in (None, os.getpid())
        assert r.app.codes.count() == BIG
        mark = r.app.db.get_meta("codes_bundle_file")
        assert mark["version"] == applied.version
    async with running(kit) as again:  # unchanged: not read again
        assert again.app.cache.last_applied is None


async def test_parts_are_staged_by_an_apply_process_and_a_killed_one_ends_the_transfer(
        kit: BankKit, broker: Broker) -> None:
    codes = plain(60)
    manifest, parts = make_parts(kit, codes, version=2)
    assert len(parts) >= 4
    async with running(kit) as r:
        await online(r)
        assert r.app.parts is not None
        await send(broker, manifest, parts[:2])
        await wait_until(lambda: r.app.parts is not None and r.app.parts.progress is not None
                         and len(r.app.parts.progress.received) == 2, what="two parts staged")
        pid = r.app.parts.process_pid
        assert pid is not None and pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        await send(broker, None, parts[2:3])
        event = await r.wait_event("cache.rejected")
        assert event.data["reason"] == "apply_failed"
        # The transfer is given up right after its refusal is recorded.
        await wait_until(lambda: r.app.parts is not None and r.app.parts.progress is None,
                         what="the transfer given up")
        assert r.app.codes.version() == 1
        await pickup_still_works(r)
        # The same manifest again: a new transfer, applied whole.
        await send(broker, manifest, parts, retain=False)
        await wait_until(lambda: r.app.codes.version() == 2, timeout=30, what="applied")
        assert r.app.codes.count() == 60
        assert r.events("cache.updated")[-1].data["parts"] == len(parts)


# What the apply process of a snapshot in parts must not load: it checks no signature (the
# daemon verified the manifest) and decodes no JSON bundle, and its memory counts on the board.
NOT_FOR_PARTS = ("cryptography", "msgspec", "structlog", "aiomqtt", "lockerd.trust.dsse",
                 "lockerd.trust.bundle", "lockerd.store.codes", "lockerd.apply.bundle")


def imported_by_children(stderr: str) -> set[str]:
    """The modules named by `python -X importtime` lines (the children's, on our stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


async def test_the_apply_process_of_parts_does_not_import_the_bundle_verification(
        kit: BankKit, broker: Broker, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the daemon's own path: the apply process it starts for a transfer inherits
    PYTHONPROFILEIMPORTTIME and the test's stderr, so every module it imports is named there."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    manifest, parts = make_parts(kit, plain(60), version=2)
    async with running(kit) as r:
        await online(r)
        capfd.readouterr()
        await send(broker, manifest, parts)
        await wait_until(lambda: r.app.codes.version() == 2, timeout=30, what="applied")
        assert r.app.codes.count() == 60
    imported = imported_by_children(capfd.readouterr().err)
    assert {"lockerd.apply.staging", "lockerd.trust.partwire"} <= imported
    assert sorted(m for m in imported
                  if any(m == bad or m.startswith(bad + ".") for bad in NOT_FOR_PARTS)) == []


def test_an_apply_process_dies_with_the_daemon(kit: BankKit) -> None:
    """The daemon killed -9 mid-apply: its apply process must not go on staging beside the
    daemon that systemd starts next (both stage in the same table). Here it waits for the
    write lock this test holds (up to the 10 s busy timeout), reading no pipe meanwhile."""
    db_path = kit.state_dir / "lockerd.db"
    now = datetime.now(UTC).isoformat()
    manifest = {"locker_id": "L1", "version": 2, "issued_at": now, "expires_at": now,
                "revoke": [], "entries": 0, "parts": []}
    script = ("import json, sys, threading; from pathlib import Path; "
              "from lockerd.apply.process import ApplyProcess; "
              "p = ApplyProcess(Path(sys.argv[1])); p.start(); "
              "request = {'op': 'begin', 'manifest': json.loads(sys.argv[2]), 'cache_kib': 2000}; "
              "threading.Thread(target=p.request, args=(request,), daemon=True).start(); "
              "print(p.pid, flush=True); threading.Event().wait(120)")
    holder = open_database(db_path)
    holder.conn.execute("BEGIN IMMEDIATE")
    daemon = subprocess.Popen([sys.executable, "-c", script, str(db_path), json.dumps(manifest)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        child = int(daemon.stdout.readline())
        assert alive(child)
        daemon.kill()
        daemon.wait()
        until_sync(lambda: not alive(child), 5, what="the apply process gone")
    finally:
        holder.conn.execute("ROLLBACK")
        holder.close()
        daemon.kill()
        daemon.wait()
        if daemon.stdout is not None:
            daemon.stdout.close()


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
