"""Shared helpers for the trust-layer tests: keys, roles, keyrings and bundles to sign."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    RoleKeys,
    pae,
    sign_envelope,
)
from lockerd.trust.keyring import ROLE_NAMES
from lockerd.trust.keys import keyid_of, public_hex

NOW = datetime(2026, 11, 29, 3, 0, 0, tzinfo=UTC)
CODE_KEY = bytes(range(32))


def wire_time(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def role(private: Sequence[Ed25519PrivateKey], threshold: int = 1) -> RoleKeys:
    return RoleKeys.from_keys([k.public_key() for k in private], threshold)


def role_doc(private: Sequence[Ed25519PrivateKey], threshold: int = 1) -> dict[str, object]:
    return {"keys": [public_hex(k.public_key()) for k in private], "threshold": threshold}


def keyring_doc(
    *,
    version: int,
    root: Sequence[Ed25519PrivateKey],
    root_threshold: int = 1,
    others: Sequence[Ed25519PrivateKey] | None = None,
    expires_at: datetime | None = None,
    issued_at: datetime | None = None,
) -> dict[str, object]:
    """A keyring payload as a dict, so tests can break it on purpose before signing."""
    other = list(others) if others is not None else keys(1)
    doc: dict[str, object] = {
        "type": "keyring",
        "version": version,
        "issued_at": wire_time(issued_at or NOW - timedelta(hours=1)),
        "expires_at": wire_time(expires_at or NOW + timedelta(days=30)),
        "root": role_doc(root, root_threshold),
    }
    for name in ROLE_NAMES[1:]:
        doc[name] = role_doc(other)
    return doc


def sign_doc(
    doc: Mapping[str, object] | bytes,
    signers: Sequence[Ed25519PrivateKey],
    payload_type: str = KEYRING_PAYLOAD_TYPE,
) -> bytes:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return sign_envelope(payload_type, payload, signers)


def code_entry_doc(code_id: str = "p-1001", /, **overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": code_id,
        "kind": "pickup",
        "digest": "ab" * 32,
        "compartment": "7",
        "parcel_id": "PX123",
        "not_before": wire_time(NOW - timedelta(days=1)),
        "not_after": wire_time(NOW + timedelta(days=7)),
        "max_uses": 1,
    }
    doc.update(overrides)
    return doc


def bundle_doc(
    *,
    locker_id: str = "L1",
    version: int = 17,
    base_version: int | None = None,
    upsert: Sequence[Mapping[str, object]] | None = None,
    revoke: Sequence[str] = ("p-0999",),
    expires_at: datetime | None = None,
) -> dict[str, object]:
    return {
        "type": "codes",
        "locker_id": locker_id,
        "version": version,
        "base_version": base_version,
        "issued_at": wire_time(NOW - timedelta(minutes=5)),
        "expires_at": wire_time(expires_at or NOW + timedelta(days=2)),
        "upsert": list(upsert) if upsert is not None else [code_entry_doc()],
        "revoke": list(revoke),
    }


def sign_bundle(doc: Mapping[str, object] | bytes, signers: Sequence[Ed25519PrivateKey]) -> bytes:
    return sign_doc(doc, signers, CODES_PAYLOAD_TYPE)


def raw_envelope(
    payload_type: str, payload: bytes, signatures: Sequence[tuple[str, bytes]]
) -> bytes:
    """An envelope assembled by hand, for shapes `sign_envelope` never produces."""
    return json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [
                {"keyid": keyid, "sig": base64.b64encode(sig).decode()} for keyid, sig in signatures
            ],
        }
    ).encode()


def signature(key: Ed25519PrivateKey, payload_type: str, payload: bytes) -> tuple[str, bytes]:
    return keyid_of(key.public_key()), key.sign(pae(payload_type, payload))
