"""DSSE v1 envelopes: PAE, signing, strict parsing and threshold verification."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.trust.keys import keyid_of, parse_public_hex, public_hex

KEYRING_PAYLOAD_TYPE = "application/vnd.lockerd.keyring+json"
CODES_PAYLOAD_TYPE = "application/vnd.lockerd.codes+json"
# The signed manifest of a snapshot sent in parts (docs/protocol.md, version 1.1 addition).
CODES_MANIFEST_PAYLOAD_TYPE = "application/vnd.lockerd.codes-manifest+json"
COMMAND_PAYLOAD_TYPE = "application/vnd.lockerd.command+json"
TECHNICIAN_PAYLOAD_TYPE = "application/vnd.lockerd.technician+json"
HELP_REPLY_PAYLOAD_TYPE = "application/vnd.lockerd.help-reply+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: the exact bytes a signature covers."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


class Signature(NamedTuple):
    """One signature of an envelope; `keyid` is only a hint until the signature verifies."""

    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed DSSE envelope. Nothing in it is trusted until `verify_threshold` says so."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]


@dataclass(frozen=True, slots=True, eq=False)
class RoleKeys:
    """The keys of one role (keyid -> public key) and how many of them must sign."""

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ValueError(f"threshold must be an integer, got {self.threshold!r}")
        if self.threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {self.threshold}")
        if self.threshold > len(self.keys):
            raise ValueError(
                f"threshold {self.threshold} is more than the {len(self.keys)} key(s) listed"
            )
        for keyid, key in self.keys.items():
            if keyid_of(key) != keyid:
                raise ValueError(f"key listed under keyid {keyid!r} has another keyid")
        # A read-only copy: the caller's dict cannot change who is trusted afterwards.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @classmethod
    def from_keys(cls, keys: Iterable[Ed25519PublicKey], threshold: int) -> RoleKeys:
        """Build from public keys; a key given twice is refused (it would not count twice)."""
        mapping: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            keyid = keyid_of(key)
            if keyid in mapping:
                raise ValueError(f"key with keyid {keyid} is listed twice")
            mapping[keyid] = key
        return cls(keys=mapping, threshold=threshold)

    @classmethod
    def from_hex(cls, hex_keys: Iterable[str], threshold: int) -> RoleKeys:
        """Build from public keys written as 64 lowercase hex characters."""
        return cls.from_keys([parse_public_hex(text) for text in hex_keys], threshold)

    @property
    def keyids(self) -> frozenset[str]:
        return frozenset(self.keys)

    def public_hexes(self) -> list[str]:
        """The keys in wire form, sorted by keyid so the output is stable."""
        return [public_hex(self.keys[keyid]) for keyid in sorted(self.keys)]

    def __eq__(self, other: object) -> bool:
        # Two roles are the same when the same keys with the same threshold are trusted.
        if not isinstance(other, RoleKeys):
            return NotImplemented
        return self.threshold == other.threshold and self.keyids == other.keyids

    def __hash__(self) -> int:
        return hash((self.threshold, self.keyids))

    def __repr__(self) -> str:
        ids = ", ".join(k[:12] for k in sorted(self.keys))
        return f"RoleKeys(threshold={self.threshold}, keyids=[{ids}])"


class _SignatureWire(msgspec.Struct):
    sig: str
    # DSSE makes keyid an optional hint; a signature without one can never be counted.
    keyid: str = ""


class _EnvelopeWire(msgspec.Struct):
    payload_type: str = msgspec.field(name="payloadType")
    payload: str
    signatures: list[_SignatureWire]


def _b64decode(text: str, *, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise TrustError(
            f"malformed envelope: {where} is not valid standard base64 with padding",
            reason="malformed",
        ) from exc


def parse_envelope(raw: bytes) -> Envelope:
    """Parse an envelope's JSON; any wrong shape raises TrustError(reason="malformed")."""
    try:
        wire = jsonsafe.decode(raw, type=_EnvelopeWire)
    except jsonsafe.JsonShapeError as exc:
        raise TrustError(
            f"malformed envelope: {exc} (expected payloadType, payload, signatures)",
            reason="malformed",
        ) from exc
    except jsonsafe.JsonInputError as exc:
        raise TrustError(f"malformed envelope: {exc}", reason="malformed") from exc
    payload = _b64decode(wire.payload, where="payload")
    signatures = tuple(
        Signature(keyid=s.keyid, sig=_b64decode(s.sig, where=f"signatures[{i}].sig"))
        for i, s in enumerate(wire.signatures)
    )
    return Envelope(payload_type=wire.payload_type, payload=payload, signatures=signatures)


def sign_envelope(payload_type: str, payload: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """Sign `payload` with each distinct key and return the envelope as UTF-8 JSON."""
    if not keys:
        raise ValueError("at least one signing key is needed")
    message = pae(payload_type, payload)
    signatures: list[dict[str, str]] = []
    seen: set[str] = set()
    for key in keys:
        keyid = keyid_of(key.public_key())
        if keyid in seen:
            continue
        seen.add(keyid)
        sig = base64.b64encode(key.sign(message)).decode("ascii")
        signatures.append({"keyid": keyid, "sig": sig})
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": signatures,
    }
    return msgspec.json.encode(envelope)


def count_valid_signers(env: Envelope, keys: Mapping[str, Ed25519PublicKey]) -> frozenset[str]:
    """The distinct keyids in `keys` whose signature over the envelope's PAE verifies."""
    message = pae(env.payload_type, env.payload)
    verified: set[str] = set()
    for keyid, sig in env.signatures:
        if keyid in verified:
            continue
        key = keys.get(keyid)
        if key is None:
            continue
        try:
            key.verify(sig, message)
        except InvalidSignature:
            # A bad signature is ignored, never an error by itself (PROTOCOL section 2).
            continue
        verified.add(keyid)
    return frozenset(verified)


def verify_threshold(
    env: Envelope,
    *,
    expected_type: str,
    keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
) -> bytes:
    """Return the payload when enough distinct authorised keys signed it; else TrustError."""
    if threshold < 1:
        # A zero threshold would accept unsigned documents: a caller bug, never a policy.
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if env.payload_type != expected_type:
        raise TrustError(
            f"envelope has payloadType {env.payload_type!r}, expected {expected_type!r}",
            reason="payload_type",
        )
    signers = count_valid_signers(env, keys)
    if len(signers) < threshold:
        raise TrustError(
            f"{expected_type} envelope has {len(signers)} valid signature(s) from authorised "
            f"keys, {threshold} needed ({len(env.signatures)} signature(s) present)",
            reason="signature",
        )
    return env.payload


def verify_role(env: Envelope, *, expected_type: str, role: RoleKeys) -> bytes:
    """`verify_threshold` with a role's keys and threshold."""
    return verify_threshold(
        env, expected_type=expected_type, keys=role.keys, threshold=role.threshold
    )
