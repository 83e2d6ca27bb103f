"""Keyring acceptance: every rule of PROTOCOL section 3, root rotation, malformed payloads."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from trustkit import NOW, bundle_doc, keyring_doc, keys, role, role_doc, sign_bundle, sign_doc

from lockerd.errors import TrustError
from lockerd.services.cache import CodeCache
from lockerd.store.codes import CodeStore
from lockerd.store.db import open_database
from lockerd.store.events import EventLog
from lockerd.trust.dsse import CODES_PAYLOAD_TYPE, KEYRING_PAYLOAD_TYPE, RoleKeys
from lockerd.trust.keyring import (
    ROLE_NAMES,
    accept_keyring,
    build_keyring_payload,
    load_stored_keyring,
    parse_keyring_payload,
)
from lockerd.trust.keys import public_hex

pytestmark = pytest.mark.unit


def _accept(raw: bytes, trusted: RoleKeys, current_version: int = 2) -> object:
    return accept_keyring(raw, trusted_root=trusted, current_version=current_version, now=NOW)


def test_valid_keyring_is_accepted() -> None:
    root = keys(1)
    codes, commands = keys(2)
    doc = keyring_doc(version=3, root=root, others=[codes])
    doc["commands"] = role_doc([commands, codes], 2)
    raw = sign_doc(doc, root)
    keyring = accept_keyring(raw, trusted_root=role(root), current_version=2, now=NOW)
    assert keyring.version == 3
    assert keyring.raw == raw
    assert keyring.root == role(root)
    assert keyring.codes == role([codes])
    assert keyring.commands == role([codes, commands], 2)
    assert set(keyring.roles) == set(ROLE_NAMES)
    assert keyring.expires_at == NOW + timedelta(days=30)
    assert keyring.issued_at == NOW - timedelta(hours=1)
    assert not keyring.is_expired(NOW)


def test_unknown_fields_are_ignored() -> None:
    root = keys(1)
    doc = keyring_doc(version=3, root=root)
    doc["comment"] = "rotated for ticket 12"
    doc["codes"] = {**role_doc(keys(1)), "label": "codes"}
    assert _accept(sign_doc(doc, root), role(root))


@pytest.mark.parametrize("version", [1, 2])
def test_older_or_equal_version_is_rollback(version: int) -> None:
    root = keys(1)
    with pytest.raises(TrustError) as err:
        _accept(sign_doc(keyring_doc(version=version, root=root), root), role(root))
    assert err.value.reason == "rollback"
    assert str(version) in str(err.value)


@pytest.mark.parametrize("expires_in", [timedelta(0), timedelta(seconds=-1), timedelta(days=-9)])
def test_expired_keyring_is_refused(expires_in: timedelta) -> None:
    root = keys(1)
    raw = sign_doc(keyring_doc(version=3, root=root, expires_at=NOW + expires_in), root)
    with pytest.raises(TrustError) as err:
        _accept(raw, role(root))
    assert err.value.reason == "expired"


def test_not_signed_by_trusted_root() -> None:
    root, other = keys(2)
    with pytest.raises(TrustError) as err:
        _accept(sign_doc(keyring_doc(version=3, root=[root]), [other]), role([root]))
    assert err.value.reason == "signature"


def test_trusted_root_threshold_applies() -> None:
    root = keys(3)
    doc = keyring_doc(version=3, root=root, root_threshold=2)
    with pytest.raises(TrustError) as err:
        _accept(sign_doc(doc, root[:1]), role(root, 2))
    assert err.value.reason == "signature"
    assert _accept(sign_doc(doc, root[1:]), role(root, 2))


def test_wrong_payload_type() -> None:
    root = keys(1)
    raw = sign_doc(keyring_doc(version=3, root=root), root, CODES_PAYLOAD_TYPE)
    with pytest.raises(TrustError) as err:
        _accept(raw, role(root))
    assert err.value.reason == "payload_type"


# --- root rotation --------------------------------------------------------------------


def test_rotation_signed_only_by_new_roots_is_refused() -> None:
    old, new = keys(1), keys(1)
    raw = sign_doc(keyring_doc(version=3, root=new), new)
    with pytest.raises(TrustError) as err:
        _accept(raw, role(old))
    assert err.value.reason == "signature"
    assert "currently trusted root" in str(err.value)


def test_rotation_signed_only_by_old_roots_is_refused() -> None:
    old, new = keys(1), keys(1)
    raw = sign_doc(keyring_doc(version=3, root=new), old)
    with pytest.raises(TrustError) as err:
        _accept(raw, role(old))
    assert err.value.reason == "signature"
    assert "NEW root" in str(err.value)


def test_rotation_signed_by_old_and_new_roots_is_accepted() -> None:
    old, new = keys(1), keys(1)
    raw = sign_doc(keyring_doc(version=3, root=new), old + new)
    keyring = accept_keyring(raw, trusted_root=role(old), current_version=2, now=NOW)
    assert keyring.root == role(new)
    # The next keyring needs only the new root.
    nxt = sign_doc(keyring_doc(version=4, root=new), new)
    assert accept_keyring(nxt, trusted_root=keyring.root, current_version=3, now=NOW)


def test_rotation_needs_the_new_roots_threshold() -> None:
    old, new = keys(1), keys(3)
    doc = keyring_doc(version=3, root=new, root_threshold=2)
    with pytest.raises(TrustError) as err:
        _accept(sign_doc(doc, old + new[:1]), role(old))
    assert err.value.reason == "signature"
    assert _accept(sign_doc(doc, old + new[:2]), role(old))


def test_raising_the_root_threshold_is_a_root_change() -> None:
    root = keys(2)
    doc = keyring_doc(version=3, root=root, root_threshold=2)
    with pytest.raises(TrustError) as err:
        _accept(sign_doc(doc, root[:1]), role(root, 1))
    assert err.value.reason == "signature"
    assert _accept(sign_doc(doc, root), role(root, 1))


def test_same_root_listed_in_another_order_is_not_a_rotation() -> None:
    a, b = keys(2)
    doc = keyring_doc(version=3, root=[b, a])
    assert _accept(sign_doc(doc, [a]), role([a, b]))


# --- malformed payloads ---------------------------------------------------------------


def _broken(mutate: str) -> tuple[dict[str, object], list[Ed25519PrivateKey]]:
    root = keys(1)
    doc = keyring_doc(version=3, root=root)
    bad_key = {"keys": ["ZZ" * 32], "threshold": 1}
    extra_key = public_hex(keys(1)[0].public_key())
    table: dict[str, object] = {
        "missing_qr": None,
        "threshold_zero": {"keys": [extra_key], "threshold": 0},
        "threshold_too_high": {"keys": [extra_key], "threshold": 2},
        "no_keys": {"keys": [], "threshold": 1},
        "bad_hex": bad_key,
        "duplicate_key": {"keys": [extra_key, extra_key], "threshold": 1},
        "threshold_string": {"keys": [extra_key], "threshold": "1"},
    }
    if mutate in table:
        if table[mutate] is None:
            del doc["qr"]
        else:
            doc["codes"] = table[mutate]
    elif mutate == "version_string":
        doc["version"] = "3"
    elif mutate == "version_negative":
        doc["version"] = -1
    elif mutate == "version_huge":
        doc["version"] = 2**64
    elif mutate == "type":
        doc["type"] = "codes"
    elif mutate == "no_type":
        del doc["type"]
    elif mutate == "time_offset":
        doc["expires_at"] = "2030-01-01T00:00:00+00:00"
    elif mutate == "no_expiry":
        del doc["expires_at"]
    return doc, root


@pytest.mark.parametrize(
    "mutate",
    [
        "missing_qr",
        "threshold_zero",
        "threshold_too_high",
        "no_keys",
        "bad_hex",
        "duplicate_key",
        "threshold_string",
        "version_string",
        "version_negative",
        "version_huge",
        "type",
        "no_type",
        "time_offset",
        "no_expiry",
    ],
)
def test_malformed_keyring_is_refused(mutate: str) -> None:
    doc, root = _broken(mutate)
    raw = sign_doc(doc, root)
    with pytest.raises(TrustError) as err:
        _accept(raw, role(root))
    assert err.value.reason == "malformed"
    assert "keyring" in str(err.value)


@pytest.mark.parametrize("payload", [b"", b"[]", b"not json", b"\xff"])
def test_payload_that_is_not_a_json_object(payload: bytes) -> None:
    root = keys(1)
    with pytest.raises(TrustError) as err:
        _accept(sign_doc(payload, root), role(root))
    assert err.value.reason == "malformed"


def test_malformed_envelope() -> None:
    with pytest.raises(TrustError) as err:
        _accept(b'{"payloadType": "x"}', role(keys(1)))
    assert err.value.reason == "malformed"


# --- building and reloading -----------------------------------------------------------


def test_build_and_parse_round_trip() -> None:
    roles = {name: role(keys(2), 2 if name == "root" else 1) for name in ROLE_NAMES}
    payload = build_keyring_payload(
        version=9, issued_at=NOW, expires_at=NOW + timedelta(days=1), roles=roles
    )
    doc = json.loads(payload)
    assert doc["type"] == "keyring"
    assert doc["issued_at"] == "2026-11-29T03:00:00Z"
    keyring = parse_keyring_payload(payload)
    assert keyring.version == 9
    assert dict(keyring.roles) == roles


def test_build_needs_every_role() -> None:
    with pytest.raises(ValueError, match="qr"):
        build_keyring_payload(
            version=1,
            issued_at=NOW,
            expires_at=NOW,
            roles={name: role(keys(1)) for name in ROLE_NAMES if name != "qr"},
        )


def test_stored_keyring_reloads_and_detects_tampering() -> None:
    old, new = keys(1), keys(1)
    raw = sign_doc(keyring_doc(version=3, root=new), old + new)
    accepted = accept_keyring(raw, trusted_root=role(old), current_version=0, now=NOW)
    reloaded = load_stored_keyring(accepted.raw)
    assert reloaded.version == 3
    assert reloaded.root == role(new)
    assert reloaded.raw == raw
    # Expiry does not stop a reload: the locker keeps running on the codes it has.
    assert load_stored_keyring(raw).is_expired(NOW + timedelta(days=365))

    doc = json.loads(raw)
    forged = keyring_doc(version=3, root=new)
    forged["version"] = 99
    doc["payload"] = base64.b64encode(json.dumps(forged).encode()).decode()
    with pytest.raises(TrustError) as err:
        load_stored_keyring(json.dumps(doc).encode())
    assert err.value.reason == "signature"


def test_stored_keyring_with_wrong_type() -> None:
    root = keys(1)
    raw = sign_doc(keyring_doc(version=3, root=root), root, CODES_PAYLOAD_TYPE)
    with pytest.raises(TrustError) as err:
        load_stored_keyring(raw)
    assert err.value.reason == "payload_type"
    assert KEYRING_PAYLOAD_TYPE in str(err.value)


# -- codes key rotation lifts the codes version floor (a real SQLite file) ------------------

MAX_VERSION = 2**63 - 1


def _cache(path: Path, root: list[Ed25519PrivateKey]) -> tuple[CodeCache, EventLog]:
    db = open_database(path)
    events = EventLog(db)
    return CodeCache(db=db, codes=CodeStore(db), events=events, locker_id="L1",
                     pinned_root=role(root), now=lambda: NOW, monotonic=lambda: 0.0), events


def _codes_keyring(version: int, root: list[Ed25519PrivateKey],
                   codes: list[Ed25519PrivateKey], threshold: int = 1) -> bytes:
    doc = keyring_doc(version=version, root=root, others=root)
    doc["codes"] = role_doc(codes, threshold)
    return sign_doc(doc, root)


def _events(events: EventLog, type_: str) -> list[dict[str, Any]]:
    return [dict(e.data) for e in events.recent(100, type_prefix=type_)]


def test_replacing_the_codes_keys_resets_the_codes_version_floor(tmp_path: Path) -> None:
    root, stolen, fresh = keys(1), keys(1), keys(1)
    cache, events = _cache(tmp_path / "bank.db", root)
    cache.load_keyring(_codes_keyring(1, root, stolen), source="test")
    assert not cache.codes_floor_reset  # the first keyring replaces nothing
    cache.load_bundle(sign_bundle(bundle_doc(version=MAX_VERSION), stolen), source="test")
    with pytest.raises(TrustError) as err:
        cache.load_bundle(sign_bundle(bundle_doc(version=5), stolen), source="test")
    assert err.value.reason == "rollback"

    cache.load_keyring(_codes_keyring(2, root, fresh), source="test")
    assert cache.codes_floor_reset
    assert _events(events, "codes.floor_reset") == [
        {"keyring_version": 2, "codes_version": MAX_VERSION, "source": "test"}]
    # Durable with the keyring: a restart before the snapshot still accepts it.
    cache, events = _cache(tmp_path / "bank.db", root)
    assert cache.codes_floor_reset
    for raw, reason in [(sign_bundle(bundle_doc(version=6), stolen), "signature"),
                        (sign_bundle(bundle_doc(version=6, base_version=MAX_VERSION), fresh),
                         "gap")]:
        with pytest.raises(TrustError) as err:
            cache.load_bundle(raw, source="test")
        assert err.value.reason == reason
    assert cache.codes_version == MAX_VERSION

    bundle = cache.load_bundle(sign_bundle(bundle_doc(version=5), fresh), source="test")
    assert bundle.version == cache.codes_version == 5
    assert not cache.codes_floor_reset
    updated = _events(events, "cache.updated")[-1]
    assert (updated["floor_reset"], updated["previous_version"]) == (True, MAX_VERSION)
    # The snapshot is the new floor.
    with pytest.raises(TrustError) as err:
        cache.load_bundle(sign_bundle(bundle_doc(version=4), fresh), source="test")
    assert err.value.reason == "rollback"
    cache.load_bundle(sign_bundle(bundle_doc(version=6, base_version=5), fresh), source="test")
    assert cache.codes_version == 6
    assert "floor_reset" not in _events(events, "cache.updated")[-1]


def test_keyrings_that_keep_the_codes_keys_do_not_reset_the_floor(tmp_path: Path) -> None:
    root, codes = keys(1), keys(2)
    cache, events = _cache(tmp_path / "bank.db", root)
    cache.load_keyring(_codes_keyring(1, root, codes), source="test")
    cache.load_bundle(sign_bundle(bundle_doc(version=MAX_VERSION), codes), source="test")
    same_keys = [
        _codes_keyring(2, root, codes[::-1]),  # listed in another order
        _codes_keyring(3, root, codes, threshold=2),  # only the threshold changes
    ]
    doc = keyring_doc(version=4, root=root, others=root)  # other roles' keys change
    doc["codes"] = role_doc(codes, 2)
    doc["commands"] = role_doc(keys(1))
    for raw in [*same_keys, sign_doc(doc, root)]:
        cache.load_keyring(raw, source="test")
        assert not cache.codes_floor_reset
    assert _events(events, "codes.floor_reset") == []
    with pytest.raises(TrustError) as err:
        cache.load_bundle(sign_bundle(bundle_doc(version=5), codes), source="test")
    assert err.value.reason == "rollback"


def test_codes_and_their_cache_updated_event_are_one_transaction(tmp_path: Path) -> None:
    root, codes = keys(1), keys(1)
    cache, events = _cache(tmp_path / "bank.db", root)
    cache.load_keyring(_codes_keyring(1, root, codes), source="test")
    cache.load_bundle(sign_bundle(bundle_doc(version=3), codes), source="test")
    # The event of the next bundle cannot be written (a real SQLite trigger refuses it): the
    # codes it carries must not be applied without it.
    db = open_database(tmp_path / "bank.db")
    db.conn.execute("CREATE TRIGGER no_update BEFORE INSERT ON events"
                    " WHEN NEW.type = 'cache.updated' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    db.close()
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        cache.load_bundle(sign_bundle(bundle_doc(version=4), codes), source="test")
    assert cache.codes_version == 3
    assert [e["version"] for e in _events(events, "cache.updated")] == [3]
    db = open_database(tmp_path / "bank.db")
    db.conn.execute("DROP TRIGGER no_update")
    db.close()
    cache.load_bundle(sign_bundle(bundle_doc(version=4), codes), source="test")
    assert cache.codes_version == 4
    assert [e["version"] for e in _events(events, "cache.updated")] == [3, 4]


def test_refused_updates_are_rate_limited_on_the_injected_clock(tmp_path: Path) -> None:
    root = keys(1)
    db = open_database(tmp_path / "bank.db")
    events = EventLog(db)
    clock = [0.0]
    cache = CodeCache(db=db, codes=CodeStore(db), events=events, locker_id="L1",
                      pinned_root=role(root), now=lambda: NOW, monotonic=lambda: clock[0],
                      rejected_per_minute=2)
    for _ in range(4):
        cache.refuse("codes", "too_large", "payload too large", source="test")
    assert len(_events(events, "cache.rejected")) == 2
    clock[0] += 60.0  # a minute on the daemon's clock, whatever the system's says
    cache.refuse("codes", "too_large", "payload too large", source="test")
    rejected = _events(events, "cache.rejected")
    assert len(rejected) == 3
    assert rejected[-1]["suppressed"] == 2
