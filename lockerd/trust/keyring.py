"""The keyring: which keys sign for each role, and the rules for accepting a new one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Literal

import msgspec

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.dsse import (
    KEYRING_PAYLOAD_TYPE,
    Envelope,
    RoleKeys,
    parse_envelope,
    verify_role,
)

ROLE_NAMES: tuple[str, ...] = ("root", "codes", "commands", "technicians", "qr")

# Versions are stored in SQLite INTEGER columns: keep them inside int64.
_MAX_VERSION = 2**63 - 1
Version = Annotated[int, msgspec.Meta(ge=0, le=_MAX_VERSION)]


class _RoleWire(msgspec.Struct):
    keys: list[str]
    threshold: int


class _KeyringWire(msgspec.Struct):
    type: Literal["keyring"]
    version: Version
    issued_at: str
    expires_at: str
    root: _RoleWire
    codes: _RoleWire
    commands: _RoleWire
    technicians: _RoleWire
    qr: _RoleWire


@dataclass(frozen=True, slots=True)
class Keyring:
    """An accepted (or stored) keyring; `raw` is the envelope exactly as received."""

    version: int
    issued_at: datetime
    expires_at: datetime
    roles: Mapping[str, RoleKeys]
    raw: bytes = b""

    def __post_init__(self) -> None:
        missing = [name for name in ROLE_NAMES if name not in self.roles]
        if missing:
            raise ValueError(f"keyring lacks role(s): {', '.join(missing)}")
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))

    @property
    def root(self) -> RoleKeys:
        return self.roles["root"]

    @property
    def codes(self) -> RoleKeys:
        return self.roles["codes"]

    @property
    def commands(self) -> RoleKeys:
        return self.roles["commands"]

    @property
    def technicians(self) -> RoleKeys:
        return self.roles["technicians"]

    @property
    def qr(self) -> RoleKeys:
        return self.roles["qr"]

    def is_expired(self, now: datetime) -> bool:
        """True from `expires_at` on: nothing new is accepted under it any more."""
        return now >= self.expires_at


def _malformed(message: str) -> TrustError:
    return TrustError(f"malformed keyring: {message}", reason="malformed")


def parse_keyring_payload(payload: bytes, *, raw: bytes = b"") -> Keyring:
    """Validate a keyring payload's JSON (no signature check); TrustError("malformed")."""
    try:
        wire = jsonsafe.decode(payload, type=_KeyringWire)
    except jsonsafe.JsonInputError as exc:
        raise _malformed(str(exc)) from exc
    try:
        issued_at = parse_time(wire.issued_at)
        expires_at = parse_time(wire.expires_at)
    except ValueError as exc:
        raise _malformed(str(exc)) from exc
    roles: dict[str, RoleKeys] = {}
    for name in ROLE_NAMES:
        role_wire: _RoleWire = getattr(wire, name)
        try:
            roles[name] = RoleKeys.from_hex(role_wire.keys, role_wire.threshold)
        except ValueError as exc:
            raise _malformed(f"role {name!r}: {exc}") from exc
    return Keyring(
        version=wire.version,
        issued_at=issued_at,
        expires_at=expires_at,
        roles=roles,
        raw=raw,
    )


def build_keyring_payload(
    *,
    version: int,
    issued_at: datetime,
    expires_at: datetime,
    roles: Mapping[str, RoleKeys],
) -> bytes:
    """The JSON payload of a keyring naming `roles` (every name in ROLE_NAMES)."""
    missing = [name for name in ROLE_NAMES if name not in roles]
    if missing:
        raise ValueError(f"keyring needs every role; missing: {', '.join(missing)}")
    doc: dict[str, object] = {
        "type": "keyring",
        "version": version,
        "issued_at": format_time(issued_at),
        "expires_at": format_time(expires_at),
    }
    for name in ROLE_NAMES:
        doc[name] = {"keys": roles[name].public_hexes(), "threshold": roles[name].threshold}
    return msgspec.json.encode(doc)


def _verify_root_signatures(env: Envelope, *, trusted_root: RoleKeys) -> Keyring:
    try:
        payload = verify_role(env, expected_type=KEYRING_PAYLOAD_TYPE, role=trusted_root)
    except TrustError as exc:
        if exc.reason != "signature":
            raise
        raise TrustError(
            f"keyring is not signed by the currently trusted root keys: {exc}",
            reason="signature",
        ) from exc
    return parse_keyring_payload(payload)


def accept_keyring(
    raw_envelope: bytes,
    *,
    trusted_root: RoleKeys,
    current_version: int,
    now: datetime,
) -> Keyring:
    """Apply every rule of PROTOCOL section 3 to a received keyring envelope.

    (a) signed by the threshold of `trusted_root`; (b) when its root differs, also by
    the threshold of its own new root; (c) version > `current_version`; (d) not expired.
    """
    env = parse_envelope(raw_envelope)
    keyring = _verify_root_signatures(env, trusted_root=trusted_root)
    if keyring.root != trusted_root:
        try:
            verify_role(env, expected_type=KEYRING_PAYLOAD_TYPE, role=keyring.root)
        except TrustError as exc:
            raise TrustError(
                "keyring rotates the root keys but is not signed by the threshold of the "
                f"NEW root keys as well: {exc}",
                reason="signature",
            ) from exc
    if keyring.version <= current_version:
        raise TrustError(
            f"keyring version {keyring.version} is not newer than the stored version "
            f"{current_version}; ignored",
            reason="rollback",
        )
    if keyring.is_expired(now):
        raise TrustError(
            f"keyring version {keyring.version} expired at {format_time(keyring.expires_at)}; "
            "issue a fresh one",
            reason="expired",
        )
    return Keyring(
        version=keyring.version,
        issued_at=keyring.issued_at,
        expires_at=keyring.expires_at,
        roles=keyring.roles,
        raw=raw_envelope,
    )


def load_stored_keyring(raw_envelope: bytes) -> Keyring:
    """Re-read a keyring this locker accepted earlier (e.g. at startup).

    Checks that it is still signed by the threshold of its own root, which catches
    a damaged or edited file; rollback and expiry are the caller's business here,
    since an expired stored keyring still keeps the codes already held.
    """
    env = parse_envelope(raw_envelope)
    if env.payload_type != KEYRING_PAYLOAD_TYPE:
        raise TrustError(
            f"stored keyring has payloadType {env.payload_type!r}, "
            f"expected {KEYRING_PAYLOAD_TYPE!r}",
            reason="payload_type",
        )
    keyring = parse_keyring_payload(env.payload, raw=raw_envelope)
    try:
        verify_role(env, expected_type=KEYRING_PAYLOAD_TYPE, role=keyring.root)
    except TrustError as exc:
        raise TrustError(
            f"stored keyring is not signed by its own root keys: {exc}", reason="signature"
        ) from exc
    return keyring
