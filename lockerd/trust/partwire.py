"""A part's binary layout, read into codes-table rows: all the apply process needs of a part.

Kept apart from lockerd.trust.parts (the signed manifest, the encoder) so that the process
which checks and stages parts imports neither `cryptography` nor `msgspec`: it checks no
signature (the daemon verified the manifest) and its memory counts on a 512 MB board.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter

from lockerd.errors import TrustError
from lockerd.ids import COMPARTMENT_ID_PATTERN, COMPARTMENT_ID_RULE

PART_MAGIC = b"LKP1"
# magic, manifest version, part index, entries in the part.
PART_HEADER = struct.Struct(">4sQII")
# digest, kind, flags, not_after, max_uses; then not_before, id, compartment, parcel_id.
ENTRY_FIXED = struct.Struct(">32sBBqQ")
ENTRY_TIME = struct.Struct(">q")
HEADER_BYTES = PART_HEADER.size
FIXED_BYTES = ENTRY_FIXED.size
TIME_BYTES = ENTRY_TIME.size
NOT_BEFORE, COMPARTMENT, PARCEL = 1, 2, 4
KNOWN_FLAGS = NOT_BEFORE | COMPARTMENT | PARCEL
# The kind byte's meaning, fixed by the wire (docs/protocol.md); lockerd.trust.bundle's
# CODE_KINDS lists the same words in the same order (a test holds the two together).
PART_KINDS: tuple[str, ...] = ("pickup", "deposit", "courier")
MAX_TEXT_BYTES = 255  # id, compartment and parcel_id: one length byte
# The times a part can carry: 1970 to the end of 9999, whole seconds.
LAST_SECOND = 253402300799
MAX_INT64 = 2**63 - 1
_COMPARTMENT_ID = re.compile(COMPARTMENT_ID_PATTERN)

CodeRow = tuple[str, str, str, str | None, str | None, int | None, int, int]
"""One code as a row of the codes table: digest (hex), id, kind, compartment, parcel_id,
not_before and not_after (epoch seconds), max_uses (lockerd.store.staging.entry_row's)."""


@dataclass(frozen=True, slots=True)
class PartRef:
    """What the manifest says of one part: its SHA-256 (hex) and its size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class CodesManifest:
    """A verified manifest: a full snapshot of `entries` codes in `parts`, and its revocations."""

    locker_id: str
    version: int
    issued_at: datetime
    expires_at: datetime
    revoke: tuple[str, ...]
    entries: int
    parts: tuple[PartRef, ...]

    @property
    def part_count(self) -> int:
        return len(self.parts)


@dataclass(frozen=True, slots=True)
class PartHeader:
    """The header of a part: which manifest version and index it says it is, and its count."""

    version: int
    index: int
    count: int


def malformed(what: str, message: str) -> TrustError:
    return TrustError(f"malformed {what}: {message}", reason="malformed")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_header(raw: bytes) -> PartHeader:
    """The part's header, not yet trusted; TrustError("malformed") for anything else."""
    if len(raw) < HEADER_BYTES:
        raise malformed("codes part", f"{len(raw)} bytes, shorter than a header")
    magic, version, index, count = PART_HEADER.unpack_from(raw)
    if magic != PART_MAGIC:
        raise malformed("codes part", f"does not start with {PART_MAGIC!r}")
    return PartHeader(version=version, index=index, count=count)


def check_header(raw: bytes, manifest: CodesManifest) -> PartHeader:
    """The header of a part of the manifest's version, at an index the manifest has (its
    size and SHA-256 not yet checked): TrustError("malformed") otherwise."""
    header = read_header(raw)
    if header.version != manifest.version:
        raise malformed("codes part", f"of version {header.version}, not of the manifest's "
                        f"{manifest.version}")
    if header.index >= manifest.part_count:
        raise malformed("codes part", f"index {header.index}, the manifest has "
                        f"{manifest.part_count} part(s)")
    return header


def check_part(raw: bytes, manifest: CodesManifest) -> PartHeader:
    """The header of a part the manifest names, at its index, size and SHA-256.

    Reasons: malformed (no header, another version, an index the manifest has not),
    hash_mismatch (size or SHA-256 not the manifest's for that index)."""
    header = check_header(raw, manifest)
    ref = manifest.parts[header.index]
    if len(raw) != ref.size or sha256_hex(raw) != ref.sha256:
        raise TrustError(f"codes part {header.index} of version {manifest.version} is not the "
                         "part the manifest names (size or SHA-256 differ)",
                         reason="hash_mismatch")
    return header


def part_rows(raw: bytes, *, revoke: Collection[str] = (),
              by_digest: bool = False) -> list[CodeRow]:
    """The entries of a part as codes-table rows, validated as a bundle's entries are:
    TrustError("malformed") for a bad entry, an id given twice in the part, an id the
    manifest revokes, or bytes beyond the count the header gives. `by_digest`: the rows in
    digest order (a fill of a table keyed by digest then dirties fewer pages per
    transaction than in the random order digests come in).

    One pass builds only the rows (no object per entry besides its row); anything it does
    not like is decoded again, entry by entry, by the checked decoder, which says what is
    wrong, and where, and has the last word."""
    header = read_header(raw)
    rows = _fast_rows(raw, header.count)
    if rows is None or (revoke and not _ids_ok(rows, revoke)):
        rows = checked_rows(raw, revoke=revoke)
    if by_digest:
        rows.sort(key=itemgetter(0))
    return rows


def _ids_ok(rows: list[CodeRow], revoke: Collection[str]) -> bool:
    return frozenset(revoke).isdisjoint(row[1] for row in rows)


def _fast_rows(raw: bytes, count: int) -> list[CodeRow] | None:
    """The rows of a part's `count` entries, or None at the first thing that is not right
    (ids the manifest revokes are checked by the caller). Why one long loop: a call, an
    object or an attribute lookup per field costs more than the rest of the decoding."""
    unpack_fixed, unpack_time = ENTRY_FIXED.unpack_from, ENTRY_TIME.unpack_from
    kinds, last_second, max_uses_limit = PART_KINDS, LAST_SECOND, MAX_INT64
    fullmatch = _COMPARTMENT_ID.fullmatch
    # A set issued at once has few distinct compartments: each is checked once.
    compartments: dict[bytes, str] = {}
    seen: set[str] = set()
    rows: list[CodeRow] = []
    append = rows.append
    at = HEADER_BYTES
    try:
        for _ in range(count):
            digest, kind, flags, not_after, max_uses = unpack_fixed(raw, at)
            at += FIXED_BYTES
            if (kind > 2 or flags > KNOWN_FLAGS or not 0 < max_uses <= max_uses_limit
                    or not 0 <= not_after <= last_second):
                return None
            not_before = None
            if flags & NOT_BEFORE:
                not_before = unpack_time(raw, at)[0]
                at += TIME_BYTES
                if not 0 <= not_before <= last_second:
                    return None
            # A length past the end gives a short slice here and an `at` past the end, which
            # the next read or the last check below turns into None.
            size = raw[at]
            end = at + 1 + size
            code_id = raw[at + 1:end].decode("utf-8")
            at = end
            if not size or code_id in seen:
                return None
            seen.add(code_id)
            compartment = parcel_id = None
            if flags & COMPARTMENT:
                size = raw[at]
                end = at + 1 + size
                text = raw[at + 1:end]
                at = end
                compartment = compartments.get(text)
                if compartment is None:
                    compartment = text.decode("utf-8")
                    if not size or fullmatch(compartment) is None:
                        return None
                    compartments[text] = compartment
            if flags & PARCEL:
                size = raw[at]
                end = at + 1 + size
                parcel_id = raw[at + 1:end].decode("utf-8")
                at = end
                if not size:
                    return None
            append((digest.hex(), code_id, kinds[kind], compartment, parcel_id, not_before,
                    not_after, max_uses))
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    return rows if at == len(raw) else None


def checked_rows(raw: bytes, *, revoke: Collection[str] = ()) -> list[CodeRow]:
    """`part_rows` one entry at a time, each field checked in turn, so that the first fault
    is the one reported (slower: the fast path hands it what it would refuse)."""
    header = read_header(raw)
    revoked = frozenset(revoke)
    at = HEADER_BYTES
    seen: set[str] = set()
    rows: list[CodeRow] = []
    for index in range(header.count):
        try:
            row, at = _checked_row(raw, at)
        except (ValueError, UnicodeDecodeError) as exc:
            raise malformed("codes part", f"part {header.index} entry {index}: {exc}") from exc
        code_id = row[1]
        if code_id in seen:
            raise malformed("codes part", f"part {header.index}: id {code_id!r} twice")
        if code_id in revoked:
            raise malformed("codes part", f"part {header.index}: id {code_id!r} is both "
                            "an entry and revoked")
        seen.add(code_id)
        rows.append(row)
    if at != len(raw):
        raise malformed("codes part", f"part {header.index}: {len(raw) - at} byte(s) after "
                        f"its {header.count} entries")
    return rows


def _read_text(raw: bytes, at: int, what: str) -> tuple[str, int]:
    end = at + 1 + (raw[at] if at < len(raw) else 0)
    if end == at + 1 or end > len(raw):
        raise ValueError(f"{what} missing or longer than the part")
    return raw[at + 1:end].decode("utf-8"), end


def _check_time(epoch: int, what: str) -> int:
    if not 0 <= epoch <= LAST_SECOND:
        raise ValueError(f"{what} {epoch} is not a time of 1970 to 9999")
    return epoch


def _checked_row(raw: bytes, at: int) -> tuple[CodeRow, int]:
    if at + FIXED_BYTES > len(raw):
        raise ValueError("truncated")
    digest, kind, flags, not_after, max_uses = ENTRY_FIXED.unpack_from(raw, at)
    at += FIXED_BYTES
    if kind >= len(PART_KINDS) or flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown kind {kind} or flags {flags:#x}")
    if not 1 <= max_uses <= MAX_INT64:
        raise ValueError(f"max_uses {max_uses} is not 1 to 2**63 - 1")
    not_before = None
    if flags & NOT_BEFORE:
        if at + TIME_BYTES > len(raw):
            raise ValueError("truncated")
        not_before = _check_time(ENTRY_TIME.unpack_from(raw, at)[0], "not_before")
        at += TIME_BYTES
    code_id, at = _read_text(raw, at, "id")
    compartment = parcel_id = None
    if flags & COMPARTMENT:
        compartment, at = _read_text(raw, at, "compartment")
    if flags & PARCEL:
        parcel_id, at = _read_text(raw, at, "parcel_id")
    _check_time(not_after, "not_after")
    if compartment is not None and _COMPARTMENT_ID.fullmatch(compartment) is None:
        raise ValueError(f"code {code_id!r}: compartment {compartment!r} is not "
                         f"{COMPARTMENT_ID_RULE}")
    return (digest.hex(), code_id, PART_KINDS[kind], compartment, parcel_id, not_before,
            not_after, max_uses), at
