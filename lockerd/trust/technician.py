"""Technician tokens (PROTOCOL section 8): parse and verify a console login token offline."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import msgspec

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.dsse import (
    TECHNICIAN_PAYLOAD_TYPE,
    Envelope,
    RoleKeys,
    count_valid_signers,
    parse_envelope,
    verify_role,
)

ROLES = ("viewer", "operator")
MAX_TOKEN_CHARS = 4096
MAX_TECH_ID = 64
MAX_NAME = 120

Role = Literal["viewer", "operator"]


class _TechnicianWire(msgspec.Struct, kw_only=True):
    type: str
    tech_id: str
    name: str = ""
    locker_ids: list[str]
    role: str
    issued_at: str
    expires_at: str


@dataclass(frozen=True, slots=True)
class Technician:
    tech_id: str
    name: str
    locker_ids: tuple[str, ...]
    role: Role
    issued_at: datetime
    expires_at: datetime

    def may_use(self, locker_id: str) -> bool:
        return "*" in self.locker_ids or locker_id in self.locker_ids


def _malformed(message: str) -> TrustError:
    return TrustError(f"malformed token: {message}", reason="malformed")


def decode_token(token: str) -> bytes:
    """The envelope JSON carried by a token (base64url without padding)."""
    text = token.strip()
    if not text or len(text) > MAX_TOKEN_CHARS:
        raise _malformed(f"a token is 1-{MAX_TOKEN_CHARS} characters of base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _malformed("not base64url text") from exc


def encode_token(envelope: bytes) -> str:
    return base64.urlsafe_b64encode(envelope).decode("ascii").rstrip("=")


def parse_technician_payload(payload: bytes) -> Technician:
    try:
        wire = jsonsafe.decode(payload, type=_TechnicianWire)
    except jsonsafe.JsonInputError as exc:
        raise _malformed(str(exc)) from exc
    if wire.type != "technician":
        raise _malformed(f"type is {wire.type!r}, expected 'technician'")
    if not wire.tech_id or len(wire.tech_id) > MAX_TECH_ID or not wire.tech_id.isprintable():
        raise _malformed(f"tech_id must be 1-{MAX_TECH_ID} printable characters")
    if len(wire.name) > MAX_NAME or not wire.name.isprintable():
        raise _malformed(f"name must be at most {MAX_NAME} printable characters")
    if not wire.locker_ids:
        raise _malformed("locker_ids must name at least one locker (or '*')")
    if wire.role not in ROLES:
        raise _malformed(f"role is {wire.role!r}; known: {', '.join(ROLES)}")
    try:
        issued, expires = parse_time(wire.issued_at), parse_time(wire.expires_at)
    except ValueError as exc:
        raise _malformed(str(exc)) from exc
    role: Role = "operator" if wire.role == "operator" else "viewer"
    return Technician(tech_id=wire.tech_id, name=wire.name, locker_ids=tuple(wire.locker_ids),
                      role=role, issued_at=issued, expires_at=expires)


def parse_token(token: str) -> Envelope:
    """The signed envelope a token carries; TrustError(reason="malformed") when it is none."""
    return parse_envelope(decode_token(token))


def verify_technician(
    token: str,
    *,
    technicians_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    now: datetime,
) -> Technician:
    """Reasons: malformed, payload_type, signature, keyring_expired, wrong_locker, expired."""
    return verify_technician_envelope(
        parse_token(token), technicians_role=technicians_role,
        keyring_expires_at=keyring_expires_at, locker_id=locker_id, now=now)


def verify_technician_envelope(
    env: Envelope,
    *,
    technicians_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    now: datetime,
) -> Technician:
    """`verify_technician` of a token already parsed by `parse_token`."""
    payload = verify_role(env, expected_type=TECHNICIAN_PAYLOAD_TYPE, role=technicians_role)
    if now >= keyring_expires_at:
        raise TrustError("the keyring has expired: no token is accepted until a fresh keyring "
                         "arrives", reason="keyring_expired")
    tech = parse_technician_payload(payload)
    if not tech.may_use(locker_id):
        raise TrustError(f"token is for locker(s) {', '.join(tech.locker_ids)}, this is "
                         f"{locker_id}", reason="wrong_locker")
    if now >= tech.expires_at:
        raise TrustError(f"token expired at {format_time(tech.expires_at)}", reason="expired")
    return tech


def token_issuer(env: Envelope, *, technicians_role: RoleKeys) -> str:
    """Whom a refused token counts against in the console's login throttle: `tech:<tech_id>`
    when its signature verifies and its payload names a technician, else `key:<keyids>` for
    the keys of the role it claims to be signed by (`key:unknown` when it claims none)."""
    signers = count_valid_signers(env, technicians_role.keys)
    if env.payload_type == TECHNICIAN_PAYLOAD_TYPE and len(signers) >= technicians_role.threshold:
        try:
            return "tech:" + parse_technician_payload(env.payload).tech_id
        except TrustError:
            return "key:" + ",".join(sorted(signers))
    # A keyid is only a claim here; limiting it to the role's keyids keeps the set small.
    claimed = sorted({s.keyid for s in env.signatures if s.keyid in technicians_role.keys})
    return "key:" + (",".join(claimed) or "unknown")


def build_technician_payload(
    *, tech_id: str, name: str, locker_ids: Sequence[str], role: str, issued_at: datetime,
    expires_at: datetime,
) -> bytes:
    doc = {"type": "technician", "tech_id": tech_id, "name": name,
           "locker_ids": list(locker_ids), "role": role, "issued_at": format_time(issued_at),
           "expires_at": format_time(expires_at)}
    payload = msgspec.json.encode(doc)
    parse_technician_payload(payload)
    return payload
