"""Snapshots in parts: the signed manifest, the compact binary parts, and their checks."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Literal, cast

import msgspec

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.ids import LOCKER_ID_RULE
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.bundle import (
    CodeEntry,
    CodeKind,
    check_keyring_current,
    check_update_claims,
    is_locker_id,
)
from lockerd.trust.dsse import (
    CODES_MANIFEST_PAYLOAD_TYPE,
    RoleKeys,
    parse_envelope,
    verify_role,
)
from lockerd.trust.partwire import (
    COMPARTMENT,
    ENTRY_FIXED,
    ENTRY_TIME,
    FIXED_BYTES,
    LAST_SECOND,
    MAX_INT64,
    MAX_TEXT_BYTES,
    NOT_BEFORE,
    PARCEL,
    PART_HEADER,
    PART_KINDS,
    TIME_BYTES,
    malformed,
    part_rows,
)
from lockerd.trust.partwire import HEADER_BYTES as HEADER_BYTES
from lockerd.trust.partwire import PART_MAGIC as PART_MAGIC
from lockerd.trust.partwire import CodesManifest as CodesManifest
from lockerd.trust.partwire import PartHeader as PartHeader
from lockerd.trust.partwire import PartRef as PartRef
from lockerd.trust.partwire import check_header as check_header
from lockerd.trust.partwire import check_part as check_part
from lockerd.trust.partwire import read_header as read_header
from lockerd.trust.partwire import sha256_hex as sha256_hex

# Re-exported above (`X as X`): the part's layout and checks live in partwire, which the
# apply process imports without this module's cryptography and msgspec.

# The largest an entry can be encoded in: the fixed fields, not_before, three strings.
MAX_ENTRY_BYTES = FIXED_BYTES + TIME_BYTES + 3 * (1 + MAX_TEXT_BYTES)
MIN_PART_BYTES = HEADER_BYTES + MAX_ENTRY_BYTES
DEFAULT_PART_BYTES = 256 << 10
_KIND_CODES = {kind: index for index, kind in enumerate(PART_KINDS)}

_Hex64 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
_Size = Annotated[int, msgspec.Meta(ge=HEADER_BYTES, le=MAX_INT64)]


@dataclass(frozen=True, slots=True)
class PartLimits:
    """What a bank accepts in a manifest ([codes] max_parts, max_entries, max_part_bytes)."""

    max_parts: int = 4096
    max_entries: int = 2_000_000
    max_part_bytes: int = 4 << 20


class _PartWire(msgspec.Struct, kw_only=True):
    sha256: _Hex64
    size: _Size


class _ManifestWire(msgspec.Struct, kw_only=True):
    type: Literal["codes_manifest"]
    locker_id: str
    version: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
    issued_at: str
    expires_at: str
    revoke: list[str] = msgspec.field(default_factory=list)
    entries: _Count
    part_count: _Count
    parts: list[_PartWire]


def _malformed(what: str, message: str) -> TrustError:
    return malformed(what, message)


def _time(text: str, field_name: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise _malformed("codes manifest", f"{field_name}: {exc}") from exc


def parse_manifest_payload(payload: bytes) -> CodesManifest:
    """Validate a manifest payload's JSON (no signature check); TrustError("malformed")."""
    try:
        wire = jsonsafe.decode(payload, type=_ManifestWire)
    except jsonsafe.JsonInputError as exc:
        raise _malformed("codes manifest", str(exc)) from exc
    if not is_locker_id(wire.locker_id):
        raise _malformed("codes manifest", f"locker_id {wire.locker_id!r} is not "
                         f"{LOCKER_ID_RULE}")
    if wire.part_count != len(wire.parts):
        raise _malformed("codes manifest", f"part_count {wire.part_count} but "
                         f"{len(wire.parts)} part(s) listed")
    if wire.entries and not wire.parts:
        raise _malformed("codes manifest", f"{wire.entries} entries in no part")
    for index, code_id in enumerate(wire.revoke):
        if not code_id:
            raise _malformed("codes manifest", f"revoke[{index}] is an empty id")
    return CodesManifest(
        locker_id=wire.locker_id,
        version=wire.version,
        issued_at=_time(wire.issued_at, "issued_at"),
        expires_at=_time(wire.expires_at, "expires_at"),
        revoke=tuple(dict.fromkeys(wire.revoke)),
        entries=wire.entries,
        parts=tuple(PartRef(sha256=p.sha256, size=p.size) for p in wire.parts),
    )


def build_manifest_payload(
    *,
    locker_id: str,
    version: int,
    issued_at: datetime,
    expires_at: datetime,
    entries: int,
    parts: Sequence[PartRef],
    revoke: Sequence[str] = (),
) -> bytes:
    """The JSON payload of a manifest; ValueError when it would not pass parsing."""
    doc = {
        "type": "codes_manifest",
        "locker_id": locker_id,
        "version": version,
        "issued_at": format_time(issued_at),
        "expires_at": format_time(expires_at),
        "revoke": list(revoke),
        "entries": entries,
        "part_count": len(parts),
        "parts": [{"sha256": p.sha256, "size": p.size} for p in parts],
    }
    payload = msgspec.json.encode(doc)
    try:
        parse_manifest_payload(payload)
    except TrustError as exc:
        raise ValueError(str(exc)) from exc
    return payload


def check_limits(manifest: CodesManifest, limits: PartLimits) -> None:
    """TrustError("too_large") for a manifest beyond what this bank is configured to take."""
    problem = ""
    if manifest.part_count > limits.max_parts:
        problem = f"{manifest.part_count} parts, over [codes] max_parts ({limits.max_parts})"
    elif manifest.entries > limits.max_entries:
        problem = f"{manifest.entries} entries, over [codes] max_entries ({limits.max_entries})"
    else:
        big = next((i for i, p in enumerate(manifest.parts)
                    if p.size > limits.max_part_bytes), None)
        if big is not None:
            problem = (f"part {big} of {manifest.parts[big].size} bytes, over [codes] "
                       f"max_part_bytes ({limits.max_part_bytes})")
    if problem:
        raise TrustError(f"codes manifest version {manifest.version} has {problem}",
                         reason="too_large")


def verify_manifest(
    raw_envelope: bytes,
    *,
    codes_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    held_version: int,
    now: datetime,
    limits: PartLimits,
    floor_reset: bool = False,
) -> CodesManifest:
    """Check a received manifest envelope as a snapshot bundle is checked (same keys, same
    order of reasons, the same version floor and its reset), then against `limits`.

    Reasons: malformed, payload_type, signature, keyring_expired, wrong_locker, rollback,
    expired, too_large.
    """
    env = parse_envelope(raw_envelope)
    payload = verify_role(env, expected_type=CODES_MANIFEST_PAYLOAD_TYPE, role=codes_role)
    check_keyring_current(keyring_expires_at, now=now)
    manifest = parse_manifest_payload(payload)
    check_update_claims(what="codes manifest", claimed_locker=manifest.locker_id,
                        version=manifest.version, expires_at=manifest.expires_at,
                        locker_id=locker_id, held_version=held_version, now=now,
                        floor_reset=floor_reset)
    check_limits(manifest, limits)
    return manifest


# --- parts ------------------------------------------------------------------------------


def _epoch(dt: datetime) -> int:
    return int(dt.timestamp())


def _text(value: str, what: str, code_id: str) -> bytes:
    data = value.encode("utf-8")
    if not 1 <= len(data) <= MAX_TEXT_BYTES:
        raise ValueError(f"code {code_id!r}: {what} must be 1-{MAX_TEXT_BYTES} bytes of "
                         f"UTF-8 in a part, got {len(data)}")
    return bytes((len(data),)) + data


def encode_entry(entry: CodeEntry) -> bytes:
    """One entry in the compact part encoding; ValueError for what a part cannot carry."""
    flags = ((NOT_BEFORE if entry.not_before is not None else 0)
             | (COMPARTMENT if entry.compartment is not None else 0)
             | (PARCEL if entry.parcel_id is not None else 0))
    times = [entry.not_after] + ([entry.not_before] if entry.not_before is not None else [])
    if any(not 0 <= _epoch(t) <= LAST_SECOND for t in times):
        raise ValueError(f"code {entry.id!r}: times in a part are 1970 to 9999")
    out = [ENTRY_FIXED.pack(bytes.fromhex(entry.digest), _KIND_CODES[entry.kind], flags,
                            _epoch(entry.not_after), entry.max_uses)]
    if entry.not_before is not None:
        out.append(ENTRY_TIME.pack(_epoch(entry.not_before)))
    out.append(_text(entry.id, "id", entry.id))
    if entry.compartment is not None:
        out.append(_text(entry.compartment, "compartment", entry.id))
    if entry.parcel_id is not None:
        out.append(_text(entry.parcel_id, "parcel_id", entry.id))
    return b"".join(out)


@dataclass
class PartWriter:
    """Cuts a stream of entries into parts of at most `max_bytes`, one part in memory."""

    version: int
    max_bytes: int = DEFAULT_PART_BYTES
    _body: bytearray = field(default_factory=bytearray)
    _count: int = 0
    _index: int = 0
    entries: int = 0

    def __post_init__(self) -> None:
        if self.max_bytes < MIN_PART_BYTES:
            raise ValueError(f"a part must be allowed at least {MIN_PART_BYTES} bytes, "
                             f"got {self.max_bytes}")

    def add(self, entry: CodeEntry) -> bytes | None:
        """Add one entry; returns the part it completed, if adding it needed a new part."""
        data = encode_entry(entry)
        done = None
        if HEADER_BYTES + len(self._body) + len(data) > self.max_bytes:
            done = self._cut()
        self._body += data
        self._count += 1
        self.entries += 1
        return done

    def finish(self) -> bytes | None:
        """The last part, or None when no entry is left over (or none was ever added)."""
        return self._cut() if self._count else None

    def _cut(self) -> bytes:
        part = PART_HEADER.pack(PART_MAGIC, self.version, self._index, self._count) + self._body
        self._index += 1
        self._body = bytearray()
        self._count = 0
        return part


def iter_part_entries(raw: bytes, *, revoke: Collection[str] = ()) -> Iterator[CodeEntry]:
    """The entries of a part as `CodeEntry` (lockerctl, tests): see `partwire.part_rows`,
    whose checks they pass; the apply process stages the rows themselves."""
    times: dict[int, datetime] = {}

    def at(epoch: int) -> datetime:
        dt = times.get(epoch)  # a set issued at once shares a few not_after values
        if dt is None:
            dt = times[epoch] = datetime.fromtimestamp(epoch, UTC)
        return dt

    for digest, code_id, kind, compartment, parcel_id, not_before, not_after, max_uses in (
            part_rows(raw, revoke=revoke)):
        yield CodeEntry(id=code_id, kind=cast(CodeKind, kind), digest=digest,
                        not_after=at(not_after), compartment=compartment,
                        parcel_id=parcel_id,
                        not_before=None if not_before is None else at(not_before),
                        max_uses=max_uses)


def decode_part(raw: bytes, *, revoke: Collection[str] = ()) -> list[CodeEntry]:
    """All entries of one part (a part's worth of memory); see `iter_part_entries`."""
    return list(iter_part_entries(raw, revoke=revoke))


@dataclass
class PartsProgress:
    """Which parts of a manifest have been staged; nothing else is remembered of them."""

    manifest: CodesManifest
    received: set[int] = field(default_factory=set)
    entries: int = 0

    @property
    def complete(self) -> bool:
        return len(self.received) == self.manifest.part_count

    def missing_runs(self, limit: int = 64) -> list[list[int]]:
        """The missing indexes as [first, last] runs (at most `limit` runs, lowest first)."""
        runs: list[list[int]] = []
        for index in range(self.manifest.part_count):
            if index in self.received:
                continue
            if runs and runs[-1][1] == index - 1:
                runs[-1][1] = index
            elif len(runs) < limit:
                runs.append([index, index])
            else:
                break
        return runs

    def add(self, index: int, entries: int) -> None:
        self.received.add(index)
        self.entries += entries
