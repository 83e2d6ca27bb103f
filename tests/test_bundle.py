"""Codes bundles and code digests: verification rules of PROTOCOL section 4."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from trustkit import CODE_KEY, NOW, bundle_doc, code_entry_doc, keys, role, sign_bundle, sign_doc

from lockerd.errors import TrustError
from lockerd.trust.bundle import (
    CodeEntry,
    CodesBundle,
    build_bundle_payload,
    parse_bundle_payload,
    verify_bundle,
)
from lockerd.trust.digest import (
    code_digest,
    derived_pickup_code,
    load_code_key,
    save_code_key,
)
from lockerd.trust.dsse import COMMAND_PAYLOAD_TYPE, RoleKeys

pytestmark = pytest.mark.unit

CODES_KEYS = keys(2)
CODES_ROLE = role(CODES_KEYS, 1)
KEYRING_EXPIRES = NOW + timedelta(days=30)


def _verify(
    raw: bytes,
    *,
    held_version: int = 16,
    locker_id: str = "L1",
    codes_role: RoleKeys = CODES_ROLE,
    keyring_expires_at: datetime = KEYRING_EXPIRES,
) -> CodesBundle:
    return verify_bundle(
        raw,
        codes_role=codes_role,
        keyring_expires_at=keyring_expires_at,
        locker_id=locker_id,
        held_version=held_version,
        now=NOW,
    )


def _refused(raw: bytes, reason: str, **kwargs: Any) -> TrustError:
    with pytest.raises(TrustError) as err:
        _verify(raw, **kwargs)
    assert err.value.reason == reason, str(err.value)
    return err.value


def test_valid_snapshot() -> None:
    bundle = _verify(sign_bundle(bundle_doc(), CODES_KEYS[:1]))
    assert bundle.is_snapshot
    assert bundle.locker_id == "L1"
    assert bundle.version == 17
    assert bundle.revoke == ("p-0999",)
    [entry] = bundle.upsert
    assert entry == CodeEntry(
        id="p-1001",
        kind="pickup",
        digest="ab" * 32,
        compartment="7",
        parcel_id="PX123",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=7),
        max_uses=1,
    )
    assert bundle.expires_at == NOW + timedelta(days=2)


def test_valid_delta_on_the_held_version() -> None:
    bundle = _verify(sign_bundle(bundle_doc(version=18, base_version=16), CODES_KEYS))
    assert not bundle.is_snapshot
    assert bundle.base_version == 16


def test_snapshot_on_an_empty_locker() -> None:
    raw = sign_bundle(bundle_doc(version=1, upsert=[], revoke=()), CODES_KEYS)
    bundle = _verify(raw, held_version=0)
    assert bundle.upsert == () and bundle.revoke == ()


def test_optional_fields_may_be_absent_or_null() -> None:
    entry = code_entry_doc("d-1", kind="deposit", compartment=None)
    for key in ("parcel_id", "not_before", "max_uses"):
        del entry[key]
    doc = bundle_doc(upsert=[entry])
    del doc["upsert"][0]["compartment"]  # type: ignore[index]
    del doc["revoke"]
    [parsed] = _verify(sign_bundle(doc, CODES_KEYS)).upsert
    assert parsed.compartment is None and parsed.parcel_id is None
    assert parsed.not_before is None
    assert parsed.max_uses == 1


def test_unknown_fields_are_ignored() -> None:
    doc = bundle_doc(upsert=[code_entry_doc(note="gate B")])
    doc["backend_batch"] = 42
    assert _verify(sign_bundle(doc, CODES_KEYS)).version == 17


def test_signed_by_a_key_outside_the_codes_role() -> None:
    _refused(sign_bundle(bundle_doc(), keys(1)), "signature")


def test_codes_role_threshold() -> None:
    strict = role(CODES_KEYS, 2)
    _refused(sign_bundle(bundle_doc(), CODES_KEYS[:1]), "signature", codes_role=strict)
    assert _verify(sign_bundle(bundle_doc(), CODES_KEYS), codes_role=strict)


def test_wrong_payload_type() -> None:
    _refused(sign_doc(bundle_doc(), CODES_KEYS, COMMAND_PAYLOAD_TYPE), "payload_type")


def test_keyring_expired() -> None:
    err = _refused(sign_bundle(bundle_doc(), CODES_KEYS), "keyring_expired", keyring_expires_at=NOW)
    assert "fresh keyring" in str(err)


def test_wrong_locker() -> None:
    err = _refused(sign_bundle(bundle_doc(locker_id="L2"), CODES_KEYS), "wrong_locker")
    assert str(err) == "codes bundle is for locker 'L2' but this locker is 'L1'"


@pytest.mark.parametrize("version", [16, 3, 0])
def test_rollback(version: int) -> None:
    _refused(sign_bundle(bundle_doc(version=version), CODES_KEYS), "rollback")


@pytest.mark.parametrize("expires_in", [timedelta(0), timedelta(seconds=-30)])
def test_expired_bundle(expires_in: timedelta) -> None:
    raw = sign_bundle(bundle_doc(expires_at=NOW + expires_in), CODES_KEYS)
    _refused(raw, "expired")


@pytest.mark.parametrize("base_version", [15, 17, 0])
def test_delta_on_another_version_is_a_gap(base_version: int) -> None:
    raw = sign_bundle(bundle_doc(version=18, base_version=base_version), CODES_KEYS)
    err = _refused(raw, "gap")
    assert "resync" in str(err)


MAX_VERSION = 2**63 - 1


@pytest.mark.parametrize("version", [5, 0, MAX_VERSION])
def test_after_a_floor_reset_a_snapshot_is_accepted_at_any_version(version: int) -> None:
    raw = sign_bundle(bundle_doc(version=version), CODES_KEYS)
    _refused(raw, "rollback", held_version=MAX_VERSION)
    bundle = verify_bundle(raw, codes_role=CODES_ROLE, keyring_expires_at=KEYRING_EXPIRES,
                           locker_id="L1", held_version=MAX_VERSION, now=NOW, floor_reset=True)
    assert bundle.version == version and bundle.is_snapshot


@pytest.mark.parametrize("base_version", [MAX_VERSION - 1, 16])
def test_after_a_floor_reset_a_delta_is_a_gap(base_version: int) -> None:
    raw = sign_bundle(bundle_doc(version=base_version + 1, base_version=base_version), CODES_KEYS)
    with pytest.raises(TrustError) as err:
        verify_bundle(raw, codes_role=CODES_ROLE, keyring_expires_at=KEYRING_EXPIRES,
                      locker_id="L1", held_version=base_version, now=NOW, floor_reset=True)
    assert err.value.reason == "gap"
    assert "full snapshot" in str(err.value)


@pytest.mark.parametrize(("raw", "reason"), [
    (sign_bundle(bundle_doc(version=5), keys(1)), "signature"),
    (sign_bundle(bundle_doc(version=5, locker_id="L2"), CODES_KEYS), "wrong_locker"),
    (sign_bundle(bundle_doc(version=5, expires_at=NOW), CODES_KEYS), "expired"),
], ids=["signature", "wrong_locker", "expired"])
def test_a_floor_reset_lifts_only_the_version_check(raw: bytes, reason: str) -> None:
    with pytest.raises(TrustError) as err:
        verify_bundle(raw, codes_role=CODES_ROLE, keyring_expires_at=KEYRING_EXPIRES,
                      locker_id="L1", held_version=MAX_VERSION, now=NOW, floor_reset=True)
    assert err.value.reason == reason


def _with_entry(**overrides: object) -> dict[str, object]:
    return bundle_doc(upsert=[code_entry_doc(**overrides)])


def _without(field: str) -> dict[str, object]:
    doc = bundle_doc()
    del doc[field]
    return doc


def _without_entry_field(field: str) -> dict[str, object]:
    entry = code_entry_doc()
    del entry[field]
    return bundle_doc(upsert=[entry])


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (_without("locker_id"), "locker_id"),
        (_without("version"), "version"),
        (_without("base_version"), "base_version"),
        (_without("expires_at"), "expires_at"),
        (_without("type"), "type"),
        ({**bundle_doc(), "type": "keyring"}, "type"),
        ({**bundle_doc(), "version": "17"}, "version"),
        ({**bundle_doc(), "version": 17.0}, "version"),
        ({**bundle_doc(), "version": True}, "version"),
        ({**bundle_doc(), "base_version": "16"}, "base_version"),
        ({**bundle_doc(), "expires_at": "2026-12-01 00:00:00"}, "expires_at"),
        ({**bundle_doc(), "upsert": {}}, "upsert"),
        ({**bundle_doc(), "revoke": [1]}, "revoke"),
        ({**bundle_doc(), "revoke": [""]}, "revoke"),
        (bundle_doc(locker_id="L 1"), "locker_id"),
        (bundle_doc(locker_id="x" * 65), "locker_id"),
        (_without_entry_field("not_after"), "not_after"),
        (_without_entry_field("digest"), "digest"),
        (_without_entry_field("kind"), "kind"),
        (_without_entry_field("id"), "id"),
        (_with_entry(kind="parcel"), "kind"),
        (_with_entry(compartment="A_1"), "compartment"),
        (_with_entry(compartment="x" * 17), "compartment"),
        (_with_entry(compartment=""), "compartment"),
        (_with_entry(compartment=7), "compartment"),
        (_with_entry(digest="AB" * 32), "digest"),
        (_with_entry(digest="ab" * 31), "digest"),
        (_with_entry(digest="ab" * 32 + "\n"), "digest"),
        (_with_entry(max_uses=0), "max_uses"),
        (_with_entry(max_uses="1"), "max_uses"),
        (_with_entry(not_after="tomorrow"), "not_after"),
        (_with_entry(not_before=0), "not_before"),
        (_with_entry(id=""), "id"),
        (bundle_doc(upsert=[code_entry_doc("a"), code_entry_doc("a", digest="cd" * 32)]), "'a'"),
        (bundle_doc(upsert=[code_entry_doc("a")], revoke=["a"]), "'a'"),
    ],
)
def test_malformed_bundle(doc: dict[str, object], needle: str) -> None:
    err = _refused(sign_bundle(doc, CODES_KEYS), "malformed")
    assert needle in str(err)


@pytest.mark.parametrize("payload", [b"", b"[]", b"{", b"\xff"])
def test_payload_that_is_not_a_json_object(payload: bytes) -> None:
    _refused(sign_bundle(payload, CODES_KEYS), "malformed")


def test_malformed_envelope() -> None:
    _refused(b"{}", "malformed")


def test_build_payload_round_trip() -> None:
    entry = CodeEntry(
        id="c-1",
        kind="courier",
        digest=code_digest(CODE_KEY, "L1", "424242"),
        not_after=NOW + timedelta(days=1),
        max_uses=5,
    )
    payload = build_bundle_payload(
        locker_id="L1",
        version=4,
        base_version=3,
        issued_at=NOW,
        expires_at=NOW + timedelta(days=2),
        upsert=[entry],
        revoke=["derived:PX9"],
    )
    doc = json.loads(payload)
    assert doc["upsert"][0]["not_before"] is None
    assert doc["upsert"][0]["not_after"] == "2026-11-30T03:00:00Z"
    bundle = parse_bundle_payload(payload)
    assert bundle.upsert == (entry,)
    assert bundle.revoke == ("derived:PX9",)
    assert bundle.base_version == 3


def test_build_payload_refuses_what_a_locker_would_refuse() -> None:
    with pytest.raises(ValueError, match="locker_id"):
        build_bundle_payload(
            locker_id="bad id", version=1, base_version=None, issued_at=NOW, expires_at=NOW
        )


@pytest.mark.parametrize(
    "overrides",
    [{"kind": "other"}, {"digest": "00"}, {"compartment": "a b"}, {"max_uses": 0}, {"id": ""}],
)
def test_code_entry_validates(overrides: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "id": "x",
        "kind": "pickup",
        "digest": "00" * 32,
        "not_after": NOW,
        **overrides,
    }
    with pytest.raises(ValueError):
        CodeEntry(**fields)  # type: ignore[arg-type]


# --- digests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locker_id", "code"),
    [("L1", "12345678"), ("locker-7_b", "0000"), ("L1", ""), ("Ω", "12")],
)
def test_code_digest_matches_an_independent_hmac(locker_id: str, code: str) -> None:
    expected = hmac.new(
        CODE_KEY, locker_id.encode("utf-8") + b"\n" + code.encode("utf-8"), hashlib.sha256
    ).hexdigest()
    assert code_digest(CODE_KEY, locker_id, code) == expected


def test_code_digest_binds_the_locker() -> None:
    assert code_digest(CODE_KEY, "L1", "1234") != code_digest(CODE_KEY, "L2", "1234")
    assert code_digest(CODE_KEY, "L1", "21234") != code_digest(CODE_KEY, "L12", "1234")


def test_code_key_must_be_32_raw_bytes() -> None:
    with pytest.raises(ValueError, match="32"):
        code_digest(CODE_KEY.hex().encode(), "L1", "1234")


def _expected_derived(locker_id: str, parcel_id: str, digits: int) -> str:
    mac = hmac.new(CODE_KEY, f"pickup\n{locker_id}\n{parcel_id}".encode(), hashlib.sha256).digest()
    return f"{int.from_bytes(mac[:8], 'big') % 10**digits:0{digits}d}"


@pytest.mark.parametrize("digits", [1, 4, 6, 8, 12])
def test_derived_pickup_code(digits: int) -> None:
    for parcel in ("PX123", "PX124", "p/ü"):
        code = derived_pickup_code(CODE_KEY, "L1", parcel, digits)
        assert code == _expected_derived("L1", parcel, digits)
        assert len(code) == digits and code.isdigit()


def test_derived_pickup_code_is_zero_padded() -> None:
    padded = next(
        parcel
        for parcel in (f"PX{i}" for i in range(10_000))
        if _expected_derived("L1", parcel, 8).startswith("0")
    )
    code = derived_pickup_code(CODE_KEY, "L1", padded)
    assert len(code) == 8
    assert code.startswith("0")
    assert code == _expected_derived("L1", padded, 8)


def test_derived_pickup_code_digits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        derived_pickup_code(CODE_KEY, "L1", "PX1", 0)


def test_code_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "L1.codekey"
    save_code_key(CODE_KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == CODE_KEY.hex() + "\n"
    assert load_code_key(path) == CODE_KEY
    with pytest.raises(FileExistsError):
        save_code_key(bytes(32), path)
    save_code_key(bytes(32), path, overwrite=True)
    assert load_code_key(path) == bytes(32)


def test_code_key_file_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(CODE_KEY.hex())
    assert load_code_key(path) == CODE_KEY


@pytest.mark.parametrize(
    "content",
    [b"", b"00" * 31 + b"\n", b"00" * 33, b"g" * 64, CODE_KEY, b"00" * 32 + b"\n\n"],
)
def test_bad_code_key_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.codekey"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.codekey"):
        load_code_key(path)
