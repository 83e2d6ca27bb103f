"""Codes bundles: the signed snapshot or delta of code digests a locker validates against."""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal, get_args

import msgspec

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.ids import (
    COMPARTMENT_ID_PATTERN,
    COMPARTMENT_ID_RULE,
    LOCKER_ID_PATTERN,
    LOCKER_ID_RULE,
)
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    Envelope,
    RoleKeys,
    Signature,
    parse_envelope,
    verify_role,
)

CodeKind = Literal["pickup", "deposit", "courier"]
CODE_KINDS: tuple[str, ...] = get_args(CodeKind)

_LOCKER_ID = re.compile(LOCKER_ID_PATTERN)
_COMPARTMENT_ID = re.compile(COMPARTMENT_ID_PATTERN)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_INT64 = 2**63 - 1

# msgspec applies patterns with re.search, so anchor with \Z: `$` would let a
# trailing newline through.
_Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
_Version = Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT64)]
_Uses = Annotated[int, msgspec.Meta(ge=1, le=_MAX_INT64)]


def is_locker_id(text: str) -> bool:
    """LOCKER_ID_RULE (PROTOCOL section 1); fullmatch, so a trailing newline is refused."""
    return isinstance(text, str) and _LOCKER_ID.fullmatch(text) is not None


def is_compartment_id(text: str) -> bool:
    """COMPARTMENT_ID_RULE (PROTOCOL section 1); fullmatch, so a trailing newline is refused."""
    return isinstance(text, str) and _COMPARTMENT_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class CodeEntry:
    """One code of a bundle: its digest and the conditions under which it opens a door."""

    id: str
    kind: CodeKind
    digest: str
    not_after: datetime
    compartment: str | None = None
    parcel_id: str | None = None
    not_before: datetime | None = None
    max_uses: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"code id must be a non-empty string, got {self.id!r}")
        if self.kind not in CODE_KINDS:
            raise ValueError(
                f"code {self.id!r}: kind must be one of {', '.join(CODE_KINDS)}, got {self.kind!r}"
            )
        if not isinstance(self.digest, str) or not _DIGEST.fullmatch(self.digest):
            raise ValueError(f"code {self.id!r}: digest must be 64 lowercase hex characters")
        if self.compartment is not None and not is_compartment_id(self.compartment):
            raise ValueError(
                f"code {self.id!r}: compartment {self.compartment!r} is not "
                f"{COMPARTMENT_ID_RULE}"
            )
        if self.parcel_id is not None and (
            not isinstance(self.parcel_id, str) or not self.parcel_id
        ):
            raise ValueError(f"code {self.id!r}: parcel_id must be a non-empty string or null")
        for name in ("not_after", "not_before"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"code {self.id!r}: {name} must be an aware datetime")
        if (
            isinstance(self.max_uses, bool)
            or not isinstance(self.max_uses, int)
            or not 1 <= self.max_uses <= _MAX_INT64
        ):
            raise ValueError(
                f"code {self.id!r}: max_uses must be an integer >= 1, got {self.max_uses!r}"
            )


@dataclass(frozen=True, slots=True)
class CodesBundle:
    """A verified codes bundle: a snapshot (base_version None) or a delta on base_version."""

    locker_id: str
    version: int
    base_version: int | None
    issued_at: datetime
    expires_at: datetime
    upsert: tuple[CodeEntry, ...]
    revoke: tuple[str, ...]

    @property
    def is_snapshot(self) -> bool:
        return self.base_version is None


class _EntryWire(msgspec.Struct, kw_only=True):
    id: str
    kind: CodeKind
    digest: _Digest
    compartment: str | None = None
    parcel_id: str | None = None
    not_before: str | None = None
    not_after: str
    max_uses: _Uses = 1


class _HeadWire(msgspec.Struct, kw_only=True):
    """A bundle with each entry left as its raw JSON: a snapshot's entries are then decoded
    a chunk at a time, never all at once (`_BundleWire` decodes them all)."""

    type: Literal["codes"]
    locker_id: str
    version: _Version
    # Required though nullable: a delta that lost its base_version must not turn
    # into a snapshot that wipes every other code.
    base_version: _Version | None
    issued_at: str
    expires_at: str
    upsert: list[msgspec.Raw] = msgspec.field(default_factory=list)
    revoke: list[str] = msgspec.field(default_factory=list)


class _BundleWire(_HeadWire, kw_only=True):
    upsert: list[_EntryWire] = msgspec.field(default_factory=list)  # type: ignore[assignment]


_ENTRY_DECODER = msgspec.json.Decoder(_EntryWire)
# The usual wire time, whole seconds: its day is parsed once per day (`_epoch`).
_WHOLE_SECONDS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", re.ASCII)
ROWS_CHUNK = 1000
"""Entries decoded to rows at a time by `SnapshotRows.chunks`."""

SnapshotRow = tuple[str, str, str, str | None, str | None, int | None, int, int]
"""A code as a row of the codes table (lockerd.store.staging.entry_row's shape)."""


def _malformed(message: str) -> TrustError:
    return TrustError(f"malformed codes bundle: {message}", reason="malformed")


def _field_time(text: str, field: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from exc


def _where(index: int, code_id: str) -> str:
    return f"upsert[{index}] (id {code_id!r})"


def _time(text: str, where: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from exc


def parse_bundle_payload(payload: bytes) -> CodesBundle:
    """Validate a codes bundle payload's JSON (no signature check); TrustError("malformed")."""
    try:
        wire = jsonsafe.decode(payload, type=_BundleWire)
    except jsonsafe.JsonInputError as exc:
        raise _malformed(str(exc)) from exc
    if not is_locker_id(wire.locker_id):
        raise _malformed(f"locker_id {wire.locker_id!r} is not {LOCKER_ID_RULE}")
    entries: list[CodeEntry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(wire.upsert):
        if item.id in seen:
            raise _malformed(f"{_where(index, item.id)}: id also used by "
                             f"upsert[{seen[item.id]}]")
        seen[item.id] = index
        # The location is only formatted when something is wrong: a million-code snapshot
        # must not pay for a million error messages it never shows.
        try:
            entries.append(
                CodeEntry(
                    id=item.id,
                    kind=item.kind,
                    digest=item.digest,
                    compartment=item.compartment,
                    parcel_id=item.parcel_id,
                    not_before=(None if item.not_before is None
                                else _field_time(item.not_before, "not_before")),
                    not_after=_field_time(item.not_after, "not_after"),
                    max_uses=item.max_uses,
                )
            )
        except ValueError as exc:
            raise _malformed(f"{_where(index, item.id)}: {exc}") from exc
    for index, code_id in enumerate(wire.revoke):
        if not code_id:
            raise _malformed(f"revoke[{index}] is an empty id")
        if code_id in seen:
            # Revoking and upserting one id in the same bundle has no single meaning.
            raise _malformed(f"id {code_id!r} is both in upsert and in revoke")
    return CodesBundle(
        locker_id=wire.locker_id,
        version=wire.version,
        base_version=wire.base_version,
        issued_at=_time(wire.issued_at, "issued_at"),
        expires_at=_time(wire.expires_at, "expires_at"),
        upsert=tuple(entries),
        revoke=tuple(wire.revoke),
    )


class _SignatureLean(msgspec.Struct):
    sig: str
    keyid: str = ""


class _EnvelopeLean(msgspec.Struct):
    """dsse's envelope wire, its payload left as the raw JSON string (no copy of it)."""

    payload_type: str = msgspec.field(name="payloadType")
    payload: msgspec.Raw
    signatures: list[_SignatureLean]


def read_envelope(raw: bytes) -> Envelope:
    """`parse_envelope(raw)` with one copy of the payload fewer: its base64 text is decoded
    straight from `raw`, never made a str first (of a 290 MB envelope, 290 MB less at once).
    Whatever is not plain (an escape in the string, a fault) is left to `parse_envelope`, so
    that the result and every refusal are its own."""
    try:
        wire = msgspec.json.decode(raw, type=_EnvelopeLean)
        text = memoryview(wire.payload)
        if bytes(text[:1]) != b'"' or b"\\" in raw:
            raise ValueError("not a plain JSON string")
        payload = binascii.a2b_base64(text[1:-1], strict_mode=True)
        signatures = tuple(Signature(keyid=s.keyid, sig=binascii.a2b_base64(s.sig,
                                                                             strict_mode=True))
                           for s in wire.signatures)
    except (msgspec.MsgspecError, RecursionError, ValueError):  # binascii.Error is one
        return parse_envelope(raw)
    return Envelope(payload_type=wire.payload_type, payload=payload, signatures=signatures)


class _Doubt(Exception):
    """Something the fast decoding of a snapshot's entries does not accept: the checked parser
    (parse_bundle_payload) then says what is wrong, with its own message."""


@dataclass(frozen=True, slots=True)
class SnapshotRows:
    """A snapshot whose signature and claims verified, its entries read as codes-table rows a
    chunk at a time (`chunks`), so that no object per entry lives longer than its chunk.

    Every check `parse_bundle_payload` makes of an entry is made here, except an id given
    twice (the codes table's UNIQUE(id) refuses it when the rows are staged: see `refusal`);
    whatever is refused is refused with the checked parser's very message and reason."""

    locker_id: str
    version: int
    issued_at: datetime
    expires_at: datetime
    revoke: tuple[str, ...]
    count: int
    payload: bytes = field(repr=False)
    entries: list[msgspec.Raw] = field(repr=False)

    def chunks(self, size: int = ROWS_CHUNK, *,
               check_ids: bool = False) -> Iterator[list[SnapshotRow]]:
        """The rows, `size` at a time, in the entries' order. TrustError("malformed") for a
        bad entry (and, with `check_ids`, for an id given twice), raised before the chunk
        holding it is given."""
        revoked = frozenset(self.revoke)
        seen: set[str] = set()
        compartments: dict[str, bool] = {}
        days: dict[str, int] = {}
        decode = _ENTRY_DECODER.decode
        entries = self.entries
        for start in range(0, len(entries), size):
            rows: list[SnapshotRow] = []
            append = rows.append
            try:
                for raw in entries[start:start + size]:
                    item = decode(raw)
                    code_id, compartment, parcel_id = item.id, item.compartment, item.parcel_id
                    if not code_id or code_id in revoked:
                        raise _Doubt
                    if check_ids:
                        if code_id in seen:
                            raise _Doubt
                        seen.add(code_id)
                    if compartment is not None:
                        ok = compartments.get(compartment)
                        if ok is None:
                            ok = compartments[compartment] = is_compartment_id(compartment)
                        if not ok:
                            raise _Doubt
                    if parcel_id is not None and not parcel_id:
                        raise _Doubt
                    not_before = item.not_before
                    append((item.digest, code_id, item.kind, compartment, parcel_id,
                            None if not_before is None else _epoch(not_before, days),
                            _epoch(item.not_after, days), item.max_uses))
            except (_Doubt, msgspec.MsgspecError, ValueError, RecursionError):
                raise self.refusal() from None
            yield rows

    def refusal(self) -> TrustError:
        """The checked parser's refusal of this payload; a generic "malformed" one if it has
        none (which would be a fault of the fast decoding, never a reason to apply)."""
        try:
            parse_bundle_payload(self.payload)
        except TrustError as exc:
            return exc
        return _malformed("an entry the checked parser accepts was refused")

    def check_entries(self) -> None:
        """Decode every entry, ids given twice included, without keeping any: the malformed
        refusal `parse_bundle_payload` would make, if it would make one."""
        for _ in self.chunks(check_ids=True):
            pass


def _epoch(text: str, days: dict[str, int]) -> int:
    """`int(parse_time(text).timestamp())`, the same for every string (ValueError for what
    parse_time refuses), a whole-seconds time's day taken from `days` (filled as it goes): a
    set issued at once spans few days, and parsing each time in full was most of the cost."""
    if len(text) == 20 and _WHOLE_SECONDS.fullmatch(text):
        day = text[:10]
        midnight = days.get(day)
        if midnight is None:
            midnight = days[day] = int(parse_time(day + "T00:00:00Z").timestamp())
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
        # datetime()'s own limits: no hour 24, no second 60.
        if hour < 24 and minute < 60 and second < 60:
            return midnight + hour * 3600 + minute * 60 + second
    return int(parse_time(text).timestamp())


def verify_snapshot_rows(
    env: Envelope,
    *,
    codes_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    held_version: int,
    now: datetime,
    floor_reset: bool = False,
) -> SnapshotRows | CodesBundle:
    """`verify_bundle` of a parsed envelope, a snapshot's entries left for `chunks`.

    The same checks in the same order and the same refusals as `verify_bundle`: a snapshot
    comes back as SnapshotRows (its entries still to be read, and refused as `verify_bundle`
    would refuse them when they are); a delta, or a payload the quick reading of its head does
    not take, goes through `verify_bundle`'s own path and comes back as a CodesBundle."""
    payload = verify_role(env, expected_type=CODES_PAYLOAD_TYPE, role=codes_role)
    check_keyring_current(keyring_expires_at, now=now)
    head = _snapshot_head(payload)
    if head is None:
        bundle = parse_bundle_payload(payload)
        _check_claims(bundle, locker_id=locker_id, held_version=held_version, now=now,
                      floor_reset=floor_reset)
        return bundle
    try:
        check_update_claims(what="codes bundle", claimed_locker=head.locker_id,
                            version=head.version, expires_at=head.expires_at,
                            locker_id=locker_id, held_version=held_version, now=now,
                            floor_reset=floor_reset)
    except TrustError:
        # verify_bundle refuses a malformed payload before it looks at its claims.
        head.check_entries()
        raise
    return head


def _snapshot_head(payload: bytes) -> SnapshotRows | None:
    """The head of a snapshot payload, or None when it is not one that `parse_bundle_payload`
    would take up to its entries (a delta, a fault, a revoke list with an empty id)."""
    try:
        wire = msgspec.json.decode(payload, type=_HeadWire)
    except (msgspec.MsgspecError, RecursionError):
        return None
    if wire.base_version is not None or not is_locker_id(wire.locker_id) or not all(wire.revoke):
        return None
    try:
        issued_at, expires_at = parse_time(wire.issued_at), parse_time(wire.expires_at)
    except ValueError:
        return None
    return SnapshotRows(locker_id=wire.locker_id, version=wire.version, issued_at=issued_at,
                        expires_at=expires_at, revoke=tuple(wire.revoke),
                        count=len(wire.upsert), payload=payload, entries=wire.upsert)


def _entry_doc(entry: CodeEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "kind": entry.kind,
        "digest": entry.digest,
        "compartment": entry.compartment,
        "parcel_id": entry.parcel_id,
        "not_before": None if entry.not_before is None else format_time(entry.not_before),
        "not_after": format_time(entry.not_after),
        "max_uses": entry.max_uses,
    }


def build_bundle_payload(
    *,
    locker_id: str,
    version: int,
    base_version: int | None,
    issued_at: datetime,
    expires_at: datetime,
    upsert: Sequence[CodeEntry] = (),
    revoke: Sequence[str] = (),
) -> bytes:
    """The JSON payload of a codes bundle; ValueError when it would not pass parsing."""
    doc = {
        "type": "codes",
        "locker_id": locker_id,
        "version": version,
        "base_version": base_version,
        "issued_at": format_time(issued_at),
        "expires_at": format_time(expires_at),
        "upsert": [_entry_doc(entry) for entry in upsert],
        "revoke": list(revoke),
    }
    payload = msgspec.json.encode(doc)
    try:
        parse_bundle_payload(payload)
    except TrustError as exc:
        raise ValueError(str(exc)) from exc
    return payload


def check_keyring_current(keyring_expires_at: datetime, *, now: datetime) -> None:
    """TrustError("keyring_expired") once the keyring held has expired: nothing new is
    accepted under it until a fresh keyring arrives."""
    if now >= keyring_expires_at:
        raise TrustError(
            f"the keyring expired at {format_time(keyring_expires_at)}: no new codes bundle "
            "is accepted until a fresh keyring arrives",
            reason="keyring_expired",
        )


def check_update_claims(
    *,
    what: str,
    claimed_locker: str,
    version: int,
    expires_at: datetime,
    locker_id: str,
    held_version: int,
    now: datetime,
    floor_reset: bool,
) -> None:
    """The checks every signed codes update passes once its signature has (PROTOCOL section
    4), in this order: wrong_locker, rollback (not with `floor_reset`), expired."""
    if claimed_locker != locker_id:
        raise TrustError(
            f"{what} is for locker {claimed_locker!r} but this locker is {locker_id!r}",
            reason="wrong_locker",
        )
    if version <= held_version and not floor_reset:
        raise TrustError(
            f"{what} version {version} is not newer than the held version "
            f"{held_version}; ignored",
            reason="rollback",
        )
    if now >= expires_at:
        raise TrustError(
            f"{what} version {version} expired at {format_time(expires_at)}",
            reason="expired",
        )


def verify_bundle(
    raw_envelope: bytes,
    *,
    codes_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    held_version: int,
    now: datetime,
    floor_reset: bool = False,
) -> CodesBundle:
    """Check a received codes bundle envelope against PROTOCOL section 4.

    Reasons: malformed, payload_type, signature, keyring_expired, wrong_locker,
    rollback, expired, gap (a delta not based on the held version: ask for a resync).
    With `floor_reset` (the codes keys were replaced since the last snapshot) a snapshot is
    accepted at any version and a delta is a gap: only a full snapshot sets the new floor.
    """
    env = parse_envelope(raw_envelope)
    payload = verify_role(env, expected_type=CODES_PAYLOAD_TYPE, role=codes_role)
    check_keyring_current(keyring_expires_at, now=now)
    bundle = parse_bundle_payload(payload)
    _check_claims(bundle, locker_id=locker_id, held_version=held_version, now=now,
                  floor_reset=floor_reset)
    return bundle


def _check_claims(bundle: CodesBundle, *, locker_id: str, held_version: int, now: datetime,
                  floor_reset: bool) -> None:
    """verify_bundle's checks once the payload parsed: the claims, then a delta's base."""
    check_update_claims(what="codes bundle", claimed_locker=bundle.locker_id,
                        version=bundle.version, expires_at=bundle.expires_at,
                        locker_id=locker_id, held_version=held_version, now=now,
                        floor_reset=floor_reset)
    if bundle.base_version is not None and floor_reset:
        raise TrustError(
            f"codes delta version {bundle.version} refused: the codes keys were replaced, so "
            "only a full snapshot (base_version null) is accepted until one is applied; a "
            "resync is needed",
            reason="gap",
        )
    if bundle.base_version is not None and bundle.base_version != held_version:
        raise TrustError(
            f"codes delta version {bundle.version} applies to version {bundle.base_version} "
            f"but this locker holds version {held_version}; a resync is needed",
            reason="gap",
        )
