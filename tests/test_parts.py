"""Snapshots in parts: manifest verification, the compact part encoding, hashes, fuzz."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trustkit import NOW, keys, role, sign_doc, wire_time

from lockerd.errors import TrustError
from lockerd.store.staging import entry_row
from lockerd.trust.bundle import CODE_KINDS, CodeEntry
from lockerd.trust.dsse import CODES_MANIFEST_PAYLOAD_TYPE, CODES_PAYLOAD_TYPE
from lockerd.trust.parts import (
    HEADER_BYTES,
    MIN_PART_BYTES,
    CodesManifest,
    PartLimits,
    PartRef,
    PartsProgress,
    PartWriter,
    build_manifest_payload,
    check_part,
    decode_part,
    encode_entry,
    parse_manifest_payload,
    read_header,
    sha256_hex,
    verify_manifest,
)
from lockerd.trust.partwire import PART_KINDS, CodeRow, checked_rows, part_rows

pytestmark = pytest.mark.unit

CODES_KEYS = keys(1)
CODES_ROLE = role(CODES_KEYS)
KEYRING_EXPIRES = NOW + timedelta(days=30)
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def entry(n: int, **overrides: object) -> CodeEntry:
    fields: dict[str, object] = {
        "id": f"p-{n}", "kind": "pickup", "digest": f"{n:064x}",
        "not_after": NOW + timedelta(days=7), "compartment": "7", "parcel_id": f"PX{n}",
        "not_before": NOW - timedelta(days=1), "max_uses": 1}
    fields.update(overrides)
    return CodeEntry(**fields)  # type: ignore[arg-type]


def cut(entries: list[CodeEntry], *, version: int = 18,
        max_bytes: int = MIN_PART_BYTES) -> list[bytes]:
    writer = PartWriter(version=version, max_bytes=max_bytes)
    parts = [p for e in entries if (p := writer.add(e)) is not None]
    if (last := writer.finish()) is not None:
        parts.append(last)
    return parts


def manifest_doc(parts: list[bytes], **overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "type": "codes_manifest", "locker_id": "L1", "version": 18,
        "issued_at": wire_time(NOW - timedelta(minutes=5)),
        "expires_at": wire_time(NOW + timedelta(days=2)), "revoke": ["p-0999"],
        "entries": sum(read_header(p).count for p in parts), "part_count": len(parts),
        "parts": [{"sha256": sha256_hex(p), "size": len(p)} for p in parts]}
    doc.update(overrides)
    return doc


def verify(raw: bytes, *, held: int = 0, floor_reset: bool = False,
           limits: PartLimits | None = None) -> CodesManifest:
    return verify_manifest(raw, codes_role=CODES_ROLE, keyring_expires_at=KEYRING_EXPIRES,
                           locker_id="L1", held_version=held, now=NOW,
                           limits=limits or PartLimits(), floor_reset=floor_reset)


def signed(doc: dict[str, object], signers: object = None) -> bytes:
    return sign_doc(doc, signers or CODES_KEYS, CODES_MANIFEST_PAYLOAD_TYPE)  # type: ignore[arg-type]


def test_a_set_cut_into_parts_comes_back_entry_for_entry() -> None:
    entries = [entry(n) for n in range(40)] + [
        entry(100, compartment=None, parcel_id=None, not_before=None, kind="courier",
              max_uses=2**63 - 1)]
    parts = cut(entries)
    assert len(parts) > 3 and all(len(p) <= MIN_PART_BYTES for p in parts)
    manifest = verify(signed(manifest_doc(parts)))
    back = []
    for raw in parts:
        header = check_part(raw, manifest)
        back.extend(decode_part(raw, revoke=manifest.revoke))
        assert header.version == 18
    assert back == entries
    assert manifest.entries == len(entries) and manifest.revoke == ("p-0999",)


def test_manifest_is_refused_as_a_snapshot_bundle_would_be() -> None:
    parts = cut([entry(1)])
    doc = manifest_doc(parts)
    cases: list[tuple[bytes, dict[str, object], str]] = [
        (signed(doc, keys(1)), {}, "signature"),
        (sign_doc(doc, CODES_KEYS, CODES_PAYLOAD_TYPE), {}, "payload_type"),
        (signed({**doc, "locker_id": "L2"}), {}, "wrong_locker"),
        (signed(doc), {"held": 18}, "rollback"),
        (signed({**doc, "expires_at": wire_time(NOW)}), {}, "expired"),
        (signed({**doc, "part_count": 2}), {}, "malformed"),
        (signed({**doc, "parts": [{"sha256": "AB" * 32, "size": 40}]}), {}, "malformed"),
        (signed({**doc, "type": "codes"}), {}, "malformed"),
        (signed({**doc, "revoke": [""]}), {}, "malformed"),
        (b"{", {}, "malformed"),
    ]
    for raw, kwargs, reason in cases:
        with pytest.raises(TrustError) as info:
            verify(raw, **kwargs)  # type: ignore[arg-type]
        assert info.value.reason == reason, (reason, str(info.value))


def test_floor_reset_takes_a_lower_version_and_expiry_of_the_keyring_counts() -> None:
    raw = signed(manifest_doc(cut([entry(1)])))
    assert verify(raw, held=40, floor_reset=True).version == 18
    with pytest.raises(TrustError) as info:
        verify_manifest(raw, codes_role=CODES_ROLE, keyring_expires_at=NOW, locker_id="L1",
                        held_version=0, now=NOW, limits=PartLimits())
    assert info.value.reason == "keyring_expired"


@pytest.mark.parametrize(("limits", "word"), [
    (PartLimits(max_parts=1), "max_parts"),
    (PartLimits(max_entries=3), "max_entries"),
    (PartLimits(max_part_bytes=HEADER_BYTES + 10), "max_part_bytes"),
])
def test_limits_refuse_a_manifest_as_too_large(limits: PartLimits, word: str) -> None:
    raw = signed(manifest_doc(cut([entry(n) for n in range(40)])))
    with pytest.raises(TrustError, match=word) as info:
        verify(raw, limits=limits)
    assert info.value.reason == "too_large"


def test_a_part_must_be_the_one_the_manifest_names() -> None:
    parts = cut([entry(n) for n in range(40)])
    manifest = parse_manifest_payload(json.dumps(manifest_doc(parts)).encode())
    flipped = bytearray(parts[1])
    flipped[-1] ^= 1
    with pytest.raises(TrustError) as info:
        check_part(bytes(flipped), manifest)
    assert info.value.reason == "hash_mismatch"
    other = cut([entry(n) for n in range(40)], version=17)
    for raw in (other[0], b"LKP0" + parts[0][4:], parts[0][:10]):
        with pytest.raises(TrustError) as info:
            check_part(raw, manifest)
        assert info.value.reason == "malformed"


def test_entries_are_validated_like_bundle_entries() -> None:
    good = cut([entry(1)])[0]
    body = bytearray(good)
    body[HEADER_BYTES + 32] = 9  # kind
    bad_kind = bytes(body)
    body = bytearray(good)
    body[HEADER_BYTES + 33] |= 0x80  # flags
    bad_flags = bytes(body)
    twice = cut([entry(1), entry(1, digest="ee" * 32)], max_bytes=1 << 16)[0]
    for raw in (bad_kind, bad_flags, good + b"\0", good[:-1], twice):
        with pytest.raises(TrustError) as info:
            decode_part(raw)
        assert info.value.reason == "malformed"
    with pytest.raises(TrustError, match="revoked"):
        decode_part(good, revoke=("p-1",))
    bad_compartment = good.replace(b"\x017", b"\x01_")
    with pytest.raises(TrustError, match="compartment"):
        decode_part(bad_compartment)


def test_what_a_part_cannot_carry_is_refused_when_writing() -> None:
    with pytest.raises(ValueError, match="id"):
        encode_entry(entry(1, id="x" * 256))
    with pytest.raises(ValueError, match="1970"):
        encode_entry(entry(1, not_before=datetime(1969, 1, 1, tzinfo=UTC)))
    with pytest.raises(ValueError, match="at least"):
        PartWriter(version=1, max_bytes=100)
    with pytest.raises(ValueError):
        build_manifest_payload(locker_id="L 1", version=1, issued_at=NOW, expires_at=NOW,
                               entries=0, parts=[])


def test_progress_names_missing_parts_as_runs() -> None:
    refs = tuple(PartRef(sha256="0" * 64, size=30) for _ in range(8))
    manifest = CodesManifest(locker_id="L1", version=1, issued_at=NOW, expires_at=NOW,
                             revoke=(), entries=8, parts=refs)
    progress = PartsProgress(manifest)
    for index in (0, 3, 4, 7):
        progress.add(index, 1)
    assert progress.missing_runs() == [[1, 2], [5, 6]]
    assert progress.missing_runs(limit=1) == [[1, 2]]
    assert not progress.complete
    for index in (1, 2, 5, 6):
        progress.add(index, 1)
    assert progress.complete and progress.missing_runs() == [] and progress.entries == 8


_texts = st.text(st.characters(codec="utf-8"), min_size=1,
                 max_size=20).filter(lambda t: len(t.encode()) <= 255)
_times = st.integers(0, 253402300799).map(lambda s: datetime.fromtimestamp(s, UTC))
_entries = st.builds(
    CodeEntry,
    id=_texts,
    kind=st.sampled_from(CODE_KINDS),
    digest=st.binary(min_size=32, max_size=32).map(bytes.hex),
    not_after=_times,
    compartment=st.none() | st.from_regex(r"[A-Za-z0-9-]{1,16}", fullmatch=True),
    parcel_id=st.none() | _texts,
    not_before=st.none() | _times,
    max_uses=st.integers(1, 2**63 - 1),
)


@FUZZ
@given(entries=st.lists(_entries, max_size=30, unique_by=lambda e: e.id),
       max_bytes=st.integers(MIN_PART_BYTES, 4 * MIN_PART_BYTES))
def test_round_trip_of_any_entries(entries: list[CodeEntry], max_bytes: int) -> None:
    parts = cut(entries, max_bytes=max_bytes)
    assert all(len(p) <= max_bytes for p in parts)
    assert [read_header(p).index for p in parts] == list(range(len(parts)))
    assert [e for p in parts for e in decode_part(p)] == entries


@FUZZ
@given(raw=st.binary(max_size=400))
def test_any_bytes_as_a_part_are_entries_or_malformed(raw: bytes) -> None:
    try:
        decode_part(b"LKP1" + raw)
    except TrustError as exc:
        assert exc.reason == "malformed"


@FUZZ
@given(data=st.data())
def test_a_part_with_any_byte_changed_is_malformed_or_still_valid(data: st.DataObject) -> None:
    raw = bytearray(cut([entry(n) for n in range(3)], max_bytes=1 << 16)[0])
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    try:
        for e in decode_part(bytes(raw)):
            assert isinstance(e, CodeEntry)
    except TrustError as exc:
        assert exc.reason == "malformed"


def test_the_part_kinds_are_the_bundle_kinds_in_wire_order() -> None:
    assert PART_KINDS == CODE_KINDS


@FUZZ
@given(entries=st.lists(_entries, min_size=1, max_size=30, unique_by=lambda e: e.id))
def test_a_part_decodes_to_the_codes_table_rows_of_its_entries(entries: list[CodeEntry]) -> None:
    (raw,) = cut(entries, max_bytes=1 << 16)
    rows = [entry_row(e) for e in entries]
    assert part_rows(raw) == checked_rows(raw) == rows
    assert part_rows(raw, by_digest=True) == sorted(rows, key=lambda r: str(r[0]))


def rows_or_refusal(decode: Callable[..., list[CodeRow]], raw: bytes,
                    revoke: tuple[str, ...]) -> list[CodeRow] | tuple[str, str]:
    try:
        return decode(raw, revoke=revoke)
    except TrustError as exc:
        return (exc.reason, str(exc))


@FUZZ
@given(data=st.data())
def test_the_fast_decoder_says_what_the_checked_one_says_of_any_change(
        data: st.DataObject) -> None:
    """The one-pass decoder that stages parts accepts exactly what the field-by-field one
    accepts, with the same rows, and refuses with the same words (it hands the part over)."""
    entries = data.draw(st.lists(_entries, min_size=1, max_size=6, unique_by=lambda e: e.id))
    raw = bytearray(cut(entries, max_bytes=1 << 16)[0])
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(HEADER_BYTES, len(raw)))]
    revoke = tuple(data.draw(st.lists(st.sampled_from([e.id for e in entries]) | _texts,
                                      max_size=2)))
    fast = rows_or_refusal(part_rows, bytes(raw), revoke)
    assert fast == rows_or_refusal(checked_rows, bytes(raw), revoke)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_the_fast_decoder_says_what_the_checked_one_says_of_any_bytes(raw: bytes) -> None:
    part = b"LKP1" + raw
    assert rows_or_refusal(part_rows, part, ()) == rows_or_refusal(checked_rows, part, ())


@FUZZ
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20))
def test_any_json_as_a_manifest_payload_is_refused_as_malformed(doc: object) -> None:
    with pytest.raises(TrustError) as info:
        parse_manifest_payload(json.dumps(doc).encode())
    assert info.value.reason == "malformed"
