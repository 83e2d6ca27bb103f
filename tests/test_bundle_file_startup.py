"""Startup with `[codes] bundle_file`: an unchanged file is not parsed again, a changed one is."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import running, stored_events

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.logs import configure_logging
from lockerd.store import CodeStore, open_database
from lockerd.trust.keys import generate_key

pytestmark = pytest.mark.e2e

CODE = "482913"
UNCHANGED = "codes bundle file unchanged since it was applied; not read again"
APPLIED = "codes bundle applied"
KEYRING_HELD = "keyring file is the keyring held; not verified again"


class DaemonLog:
    """The daemon's own JSON log lines at info level, as journald would get them."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        configure_logging("info", "json", stream=self.stream)

    def take(self) -> list[dict[str, Any]]:
        """The lines logged since the last call."""
        lines = self.stream.getvalue().splitlines()
        self.stream.seek(0)
        self.stream.truncate()
        return [json.loads(line) for line in lines if line.startswith("{")]


def messages(lines: list[dict[str, Any]]) -> list[str]:
    """The messages about the codes bundle file (the keyring file has its own)."""
    return [str(line["event"]) for line in lines if line.get("what", "codes") == "codes"]


@pytest.fixture
def kit(make_kit: Callable[..., BankKit]) -> BankKit:
    return make_kit([PlainCode("p-1", CODE, "2", parcel_id="PX9")], parcels=["2"])


def held_version(kit: BankKit) -> int:
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        return CodeStore(db).version()
    finally:
        db.close()


def updates(kit: BankKit) -> list[int]:
    return [int(e.data["version"]) for e in stored_events(kit) if e.type == "cache.updated"]


async def test_an_unchanged_bundle_file_is_not_parsed_at_the_next_start(kit: BankKit) -> None:
    log = DaemonLog()
    async with running(kit) as r:
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    first = log.take()
    assert APPLIED in messages(first) and UNCHANGED not in messages(first)
    async with running(kit) as r:
        assert r.app.codes.version() == 1
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    second = log.take()
    assert UNCHANGED in messages(second), messages(second)
    assert APPLIED not in messages(second)
    # Neither read as "not newer": it was never parsed.
    assert "signed file is not newer than what is held; kept" not in messages(second)
    skipped = next(line for line in second if line["event"] == UNCHANGED)
    assert skipped["version"] == 1 and skipped["path"] == str(kit.bundle_path)
    assert updates(kit) == [1]
    # The keyring file, unchanged too, is not verified again either.
    assert KEYRING_HELD in [line["event"] for line in second]


async def test_a_one_byte_change_is_verified_again_and_refused(kit: BankKit) -> None:
    log = DaemonLog()
    async with running(kit):
        pass
    raw = kit.bundle_path.read_bytes()
    sig = json.loads(raw)["signatures"][0]["sig"]
    at = raw.index(sig.encode()) + len(sig) // 2
    flipped = b"A" if raw[at:at + 1] != b"A" else b"B"
    kit.bundle_path.write_bytes(raw[:at] + flipped + raw[at + 1:])
    log.take()
    async with running(kit) as r:
        # Refused, and the codes held stay in force.
        assert r.app.codes.version() == 1
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    lines = log.take()
    assert UNCHANGED not in messages(lines)
    rejected = [e for e in stored_events(kit) if e.type == "cache.rejected"]
    assert [e.data["reason"] for e in rejected] == ["signature"]
    assert rejected[0].data["source"] == str(kit.bundle_path)


async def test_a_changed_file_is_applied_and_then_skipped_in_turn(kit: BankKit) -> None:
    log = DaemonLog()
    async with running(kit):
        pass
    kit.bundle_path.write_bytes(
        kit.bundle([PlainCode("p-2", "777777", "2", parcel_id="PX9")], version=2))
    log.take()
    async with running(kit) as r:
        assert r.app.codes.version() == 2
        assert r.app.codes.lookup(kit.digest("777777")) is not None
        assert r.app.codes.lookup(kit.digest(CODE)) is None
    assert APPLIED in messages(log.take())
    async with running(kit):
        pass
    assert UNCHANGED in messages(log.take())
    assert updates(kit) == [1, 2]


async def test_a_reset_database_applies_the_unchanged_file_again(kit: BankKit) -> None:
    log = DaemonLog()
    async with running(kit):
        pass
    for db_file in kit.state_dir.glob("lockerd.db*"):
        db_file.unlink()
    log.take()
    async with running(kit) as r:
        assert r.app.codes.version() == 1
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    lines = log.take()
    assert APPLIED in messages(lines) and UNCHANGED not in messages(lines)
    assert updates(kit) == [1]


async def test_a_same_hash_file_is_read_again_once_the_held_version_moved_on(
    kit: BankKit,
) -> None:
    log = DaemonLog()
    async with running(kit) as r:
        # A newer snapshot arrives another way (over MQTT, `lockerd import-bundle`).
        r.app.cache.load_bundle(
            kit.bundle([PlainCode("p-1", CODE, "2", parcel_id="PX9")], version=3),
            source="mqtt")
    log.take()
    async with running(kit) as r:
        assert r.app.codes.version() == 3
    lines = log.take()
    # The file's hash still matches its mark, but not the version held: parsed and kept out.
    assert UNCHANGED not in messages(lines)
    assert "signed file is not newer than what is held; kept" in messages(lines)
    assert held_version(kit) == 3


async def test_a_changed_keyring_file_is_verified_and_loaded(kit: BankKit) -> None:
    async with running(kit) as r:
        assert r.app.cache.keyring_version == 1
    kit.keyring_path.write_bytes(kit.keyring(version=2))
    log = DaemonLog()
    async with running(kit) as r:
        assert r.app.cache.keyring_version == 2
    assert KEYRING_HELD not in [line["event"] for line in log.take()]
    assert [e.data["version"] for e in stored_events(kit) if e.type == "keyring.updated"] == [1, 2]


async def test_a_rotated_codes_key_reads_the_unchanged_bundle_file_again(kit: BankKit) -> None:
    async with running(kit):
        pass
    # The keyring file now names another codes key: the floor is reset, so the same bundle
    # file (signed by the old key) must be verified again, and is refused.
    kit.codes_key = generate_key()
    kit.keyring_path.write_bytes(kit.keyring(version=2))
    log = DaemonLog()
    async with running(kit) as r:
        assert r.app.cache.codes_floor_reset
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    assert UNCHANGED not in messages(log.take())
    rejected = [e for e in stored_events(kit) if e.type == "cache.rejected"]
    assert [e.data["reason"] for e in rejected] == ["signature"]


async def test_a_bundle_file_gone_is_logged_and_the_codes_held_stay(kit: BankKit) -> None:
    async with running(kit):
        pass
    kit.bundle_path.unlink()
    log = DaemonLog()
    async with running(kit) as r:
        assert r.app.codes.version() == 1
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    errors = [line for line in log.take() if line["event"] == "cannot read signed file named in "
              "the config"]
    assert [(e["what"], e["path"]) for e in errors] == [("codes", str(kit.bundle_path))]


OLDER_SKIPPED = "codes bundle file older than the codes held, as verified before; not read"
NOT_NEWER = "signed file is not newer than what is held; kept"


def rejections(kit: BankKit) -> list[str]:
    return [str(e.data["reason"]) for e in stored_events(kit) if e.type == "cache.rejected"]


async def outgrow_the_file(kit: BankKit, log: DaemonLog) -> None:
    """Apply the file (version 1), then a version 3 the way MQTT would; one more start
    refuses the older file once."""
    async with running(kit) as r:
        r.app.cache.load_bundle(
            kit.bundle([PlainCode("p-1", CODE, "2", parcel_id="PX9")], version=3),
            source="mqtt")
    async with running(kit) as r:
        assert r.app.codes.version() == 3
    assert NOT_NEWER in messages(log.take())
    assert rejections(kit) == ["rollback"]


async def test_an_older_file_refused_once_is_skipped_at_the_next_start(kit: BankKit) -> None:
    log = DaemonLog()
    await outgrow_the_file(kit, log)
    async with running(kit) as r:
        assert r.app.codes.version() == 3
        assert r.app.codes.lookup(kit.digest(CODE)) is not None
    lines = log.take()
    assert OLDER_SKIPPED in messages(lines), messages(lines)
    assert NOT_NEWER not in messages(lines) and APPLIED not in messages(lines)
    skipped = next(line for line in lines if line["event"] == OLDER_SKIPPED)
    assert (skipped["version"], skipped["held_version"]) == (1, 3)
    # No new cache.rejected: the one of the first refusal only.
    assert rejections(kit) == ["rollback"]
    assert held_version(kit) == 3


async def test_a_changed_older_file_is_read_and_refused_again(kit: BankKit) -> None:
    log = DaemonLog()
    await outgrow_the_file(kit, log)
    kit.bundle_path.write_bytes(
        kit.bundle([PlainCode("p-2", "777777", "2", parcel_id="PX9")], version=2))
    async with running(kit) as r:
        assert r.app.codes.lookup(kit.digest("777777")) is None
    lines = log.take()
    assert OLDER_SKIPPED not in messages(lines) and NOT_NEWER in messages(lines)
    assert rejections(kit) == ["rollback", "rollback"]
    # That one is marked in turn.
    async with running(kit):
        pass
    assert OLDER_SKIPPED in messages(log.take())
    assert rejections(kit) == ["rollback", "rollback"]


async def test_a_floor_reset_reads_the_older_file_again(kit: BankKit) -> None:
    log = DaemonLog()
    await outgrow_the_file(kit, log)
    kit.codes_key = generate_key()
    kit.keyring_path.write_bytes(kit.keyring(version=2))
    async with running(kit) as r:
        assert r.app.cache.codes_floor_reset
    lines = log.take()
    assert OLDER_SKIPPED not in messages(lines)
    # Read and verified again: signed by the replaced key, so refused.
    assert rejections(kit) == ["rollback", "signature"]


async def test_the_same_signed_bundle_in_other_bytes_is_read_again(kit: BankKit) -> None:
    log = DaemonLog()
    await outgrow_the_file(kit, log)
    # Same payload and signature, one more space: another hash, so verified again.
    raw = kit.bundle_path.read_bytes()
    kit.bundle_path.write_bytes(raw.replace(b'"signatures"', b' "signatures"', 1))
    async with running(kit) as r:
        assert r.app.codes.version() == 3
    assert OLDER_SKIPPED not in messages(log.take())
    assert rejections(kit) == ["rollback", "rollback"]


async def test_a_mark_not_as_written_is_ignored_and_the_file_read(kit: BankKit) -> None:
    log = DaemonLog()
    await outgrow_the_file(kit, log)
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        mark = db.get_meta("codes_bundle_file")
        assert mark["verified"] is True and mark["version"] == 1
        db.set_meta("codes_bundle_file", {**mark, "version": "1"})
    finally:
        db.close()
    async with running(kit) as r:
        assert r.app.codes.version() == 3
    lines = log.take()
    assert OLDER_SKIPPED not in messages(lines) and NOT_NEWER in messages(lines)
    assert rejections(kit) == ["rollback", "rollback"]


def _unchanged_line(lines: list[dict[str, Any]]) -> dict[str, Any]:
    return next(line for line in lines if line["event"] == UNCHANGED)


async def test_a_settled_file_is_hashed_once_and_again_only_when_its_stat_changes(
        kit: BankKit) -> None:
    hour_ago = time.time() - 3600
    os.utime(kit.bundle_path, (hour_ago, hour_ago))  # written long before this start
    log = DaemonLog()
    async with running(kit):
        pass
    assert APPLIED in messages(log.take())
    async with running(kit):  # its SHA-256 from its stat, kept when it was hashed
        pass
    assert _unchanged_line(log.take())["sha256_from"] == "stat"
    # Touched: the stat changed, so it is hashed again (and is still the file applied).
    os.utime(kit.bundle_path, (hour_ago - 60, hour_ago - 60))
    async with running(kit):
        pass
    assert _unchanged_line(log.take())["sha256_from"] == "hash"
    async with running(kit):
        pass
    assert _unchanged_line(log.take())["sha256_from"] == "stat"
    assert updates(kit) == [1]


async def test_a_file_rewritten_in_place_with_its_old_stat_back_is_not_trusted_by_stat(
        kit: BankKit) -> None:
    # Bytes changed and mtime put back (cp -p, rsync -t): the change time still moves on.
    hour_ago = time.time() - 3600
    os.utime(kit.bundle_path, (hour_ago, hour_ago))
    log = DaemonLog()
    async with running(kit):
        pass
    log.take()
    raw = bytearray(kit.bundle_path.read_bytes())
    raw[-3] ^= 1
    kit.bundle_path.write_bytes(bytes(raw))
    os.utime(kit.bundle_path, (hour_ago, hour_ago))
    async with running(kit) as r:
        assert r.app.codes.version() == 1
    assert UNCHANGED not in messages(log.take())


async def test_a_file_just_written_is_hashed_at_every_start(kit: BankKit) -> None:
    log = DaemonLog()
    async with running(kit):
        pass
    log.take()
    async with running(kit):
        pass
    assert _unchanged_line(log.take())["sha256_from"] == "hash"
