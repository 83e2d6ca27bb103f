"""QR tokens (PROTOCOL section 9): minting, verification, and refusal of every malformed shape."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import base45  # type: ignore[import-untyped]  # no type hints shipped
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trustkit import NOW, keys, role

from lockerd.errors import TrustError
from lockerd.trust.dsse import RoleKeys
from lockerd.trust.keys import keyid_of
from lockerd.trust.qrtoken import (
    MAX_QR_CHARS,
    QR_KINDS,
    QR_PREFIX,
    QrToken,
    decode_qr_token,
    decode_qr_token_with_signer,
    is_qr_token,
    mint_qr_token,
    peek_qr_token,
    verify_qr_token,
)

pytestmark = pytest.mark.unit

QR_KEY, CODES_KEY = keys(2)
QR_ROLE = role([QR_KEY])
KEYRING_EXPIRES = NOW + timedelta(days=30)
EXP = NOW + timedelta(hours=1)
CTI = bytes(range(1, 17))


def kid_of(key: Ed25519PrivateKey) -> bytes:
    return bytes.fromhex(keyid_of(key.public_key()))[:8]


def epoch(dt: datetime) -> int:
    return int(dt.timestamp())


def verify(text: str, *, now: datetime = NOW, locker_id: str = "L1",
           qr_role: RoleKeys = QR_ROLE, keyring_expires_at: datetime = KEYRING_EXPIRES) -> QrToken:
    return verify_qr_token(text, qr_role=qr_role, keyring_expires_at=keyring_expires_at,
                           locker_id=locker_id, now=now)


def refusal(text: str, **kwargs: Any) -> str:
    with pytest.raises(TrustError) as info:
        verify(text, **kwargs)
    return info.value.reason


def mint(**overrides: Any) -> str:
    args: dict[str, Any] = {"signer": QR_KEY, "locker_id": "L1", "kind": "pickup", "cti": CTI,
                            "expires_at": EXP, "compartment": "7"}
    args.update(overrides)
    return mint_qr_token(**args)


DROP = object()


def claims(**overrides: Any) -> dict[Any, Any]:
    """The claims of a good pickup token; an override of DROP removes the claim."""
    names = {"sub": 2, "exp": 4, "nbf": 5, "cti": 7, "kind": -65537, "compartment": -65538,
             "parcel_id": -65539}
    doc: dict[Any, Any] = {2: "L1", 4: epoch(EXP), 7: CTI, -65537: "pickup", -65538: "7"}
    for name, value in overrides.items():
        key = names[name]
        if value is DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def encode(cose: bytes) -> str:
    encoded: bytes = base45.b45encode(cose)
    return QR_PREFIX + encoded.decode("ascii")


def build(
    *,
    claims_doc: object | None = None,
    payload: object = None,
    protected: object = None,
    protected_map: Mapping[Any, Any] | None = None,
    unprotected: object = None,
    signer: Ed25519PrivateKey = QR_KEY,
    kid: bytes | None = None,
    tag: int | None = 18,
    signature: bytes | None = None,
    trailing: bytes = b"",
) -> str:
    """A COSE_Sign1 token assembled by hand, correctly signed unless told otherwise."""
    if protected is None:
        header = protected_map if protected_map is not None else {
            1: -8, 4: kid if kid is not None else kid_of(signer)}
        protected = cbor2.dumps(header)
    if payload is None:
        payload = cbor2.dumps(claims() if claims_doc is None else claims_doc)
    if signature is None and isinstance(protected, bytes) and isinstance(payload, bytes):
        signature = signer.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    sign1 = [protected, {} if unprotected is None else unprotected, payload,
             signature if signature is not None else b"\0" * 64]
    body: object = sign1 if tag is None else cbor2.CBORTag(tag, sign1)
    return encode(cbor2.dumps(body) + trailing)


# --- accepted tokens -------------------------------------------------------------------


@pytest.mark.parametrize("kind", QR_KINDS)
def test_round_trip_of_each_kind(kind: str) -> None:
    nbf = NOW - timedelta(minutes=5)
    text = mint(kind=kind, not_before=nbf, parcel_id="PX-123")
    assert is_qr_token(text)
    token = verify(text)
    assert token == QrToken(cti=CTI, kind=kind, locker_id="L1", expires_at=EXP,
                            not_before=nbf, compartment="7", parcel_id="PX-123",
                            kid=kid_of(QR_KEY))
    assert token.expires_at.tzinfo is not None and token.expires_at.utcoffset() == timedelta(0)
    assert token.cti_hex == CTI.hex()


def test_optional_claims_absent() -> None:
    token = verify(mint(kind="deposit", compartment=None))
    assert (token.kind, token.compartment, token.parcel_id, token.not_before) == (
        "deposit", None, None, None)


def test_wire_shape_is_the_protocol_one() -> None:
    cose = base45.b45decode(mint(not_before=NOW - timedelta(minutes=1), parcel_id="PX1")[4:])
    item = cbor2.loads(cose)
    assert isinstance(item, cbor2.CBORTag) and item.tag == 18
    protected, unprotected, payload, signature = item.value
    assert cbor2.loads(protected) == {1: -8, 4: kid_of(QR_KEY)}
    assert dict(unprotected) == {}
    assert cbor2.loads(payload) == {2: "L1", 4: epoch(EXP), 5: epoch(NOW) - 60, 7: CTI,
                                    -65537: "pickup", -65538: "7", -65539: "PX1"}
    QR_KEY.public_key().verify(signature, cbor2.dumps(["Signature1", protected, b"", payload]))


def test_untagged_cose_sign1_is_accepted() -> None:
    text = mint(tagged=False)
    assert base45.b45decode(text[4:])[0] == 0x84  # an array of 4, no tag in front
    assert verify(text).cti == CTI
    assert verify(build(tag=None)).cti == CTI


def test_hand_built_token_is_accepted() -> None:
    # Guards the helper the refusal tests below are built with.
    assert verify(build()).compartment == "7"


def test_unknown_claims_and_unprotected_contents_are_ignored() -> None:
    doc = claims()
    doc.update({6: epoch(NOW), 99: [1, {"x": b"y"}], "note": "hi", -70000: cbor2.CBORTag(1, 5)})
    text = build(claims_doc=doc, unprotected={4: b"whatever", 33: [b"x509"]})
    assert verify(text).kind == "pickup"


def test_one_signature_satisfies_any_threshold() -> None:
    other = keys(1)[0]
    strict_role = role([QR_KEY, other], threshold=2)
    token, keyid = decode_qr_token_with_signer(mint(), qr_role=strict_role)
    assert keyid == keyid_of(QR_KEY.public_key())
    assert token.cti == CTI


def test_every_key_sharing_the_kid_is_tried() -> None:
    wrong = keys(1)[0]
    prefix = keyid_of(QR_KEY.public_key())[:16]
    shared = SimpleNamespace(keys={prefix + "0" * 48: wrong.public_key(),
                                   prefix + "1" * 48: QR_KEY.public_key()}, threshold=1)
    _token, keyid = decode_qr_token_with_signer(mint(), qr_role=cast(RoleKeys, shared))
    assert keyid == prefix + "1" * 48


def test_not_before_boundary_and_expiry_boundary() -> None:
    nbf = NOW + timedelta(minutes=10)
    text = mint(not_before=nbf)
    assert refusal(text) == "not_yet_valid"
    assert refusal(text, now=nbf - timedelta(seconds=1)) == "not_yet_valid"
    assert verify(text, now=nbf).not_before == nbf
    assert verify(text, now=EXP - timedelta(seconds=1)).expires_at == EXP
    assert refusal(text, now=EXP) == "expired"
    assert refusal(text, now=EXP + timedelta(days=1)) == "expired"


# --- refusals by meaning ---------------------------------------------------------------


def test_wrong_locker() -> None:
    assert refusal(mint(locker_id="L2")) == "wrong_locker"


def test_keyring_expired() -> None:
    assert refusal(mint(), keyring_expires_at=NOW) == "keyring_expired"
    assert refusal(mint(), keyring_expires_at=NOW - timedelta(days=1)) == "keyring_expired"


def test_order_of_late_checks() -> None:
    expired_elsewhere = mint(locker_id="L2", expires_at=NOW - timedelta(minutes=1))
    assert refusal(expired_elsewhere, keyring_expires_at=NOW) == "keyring_expired"
    assert refusal(expired_elsewhere) == "wrong_locker"
    early_and_late = mint(not_before=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1))
    assert refusal(early_and_late) == "expired"


def test_signed_by_a_key_outside_the_qr_role() -> None:
    text = mint(signer=CODES_KEY)
    assert refusal(text) == "unknown_key"
    # The claims are readable, just not trusted.
    assert peek_qr_token(text).kid == kid_of(CODES_KEY)


def test_kid_of_the_qr_key_but_signed_by_another() -> None:
    assert refusal(build(signer=CODES_KEY, kid=kid_of(QR_KEY))) == "signature"


def test_bad_signature_bytes() -> None:
    assert refusal(build(signature=b"\0" * 64)) == "signature"
    assert refusal(build(signature=b"\0" * 63)) == "signature"
    assert refusal(build(signature=b"")) == "signature"


def test_signature_checked_before_any_claim_is_trusted() -> None:
    # Refused for its signature, not for being expired or another locker's.
    forged = build(signer=CODES_KEY, kid=kid_of(QR_KEY),
                   claims_doc=claims(sub="L2", exp=epoch(NOW) - 10))
    assert refusal(forged) == "signature"
    with pytest.raises(TrustError) as info:
        decode_qr_token(forged, qr_role=QR_ROLE)
    assert info.value.reason == "signature"


def test_too_large() -> None:
    huge = QR_PREFIX + "0" * (MAX_QR_CHARS + 1 - len(QR_PREFIX))
    assert len(huge) == MAX_QR_CHARS + 1
    assert refusal(huge) == "too_large"
    assert refusal(huge + "!!!") == "too_large"
    at_limit = QR_PREFIX + "0" * (MAX_QR_CHARS - len(QR_PREFIX))
    assert refusal(at_limit) != "too_large"


@pytest.mark.parametrize(
    "text",
    ["LK1:abc!!", "LK1:abcdef", "LK1:A", "LK1:::::::", "LK2:000", "lk1:000", "", "LK1"],
)
def test_not_base45(text: str) -> None:
    assert refusal(text) == "not_base45"


def test_is_qr_token() -> None:
    assert is_qr_token("LK1:")
    assert not is_qr_token("12345678")
    assert not is_qr_token("lk1:ABC")


CBOR_CASES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("a map, not an array", cbor2.dumps({1: 2})),
    ("an integer", cbor2.dumps(5)),
    ("array of 3", cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""]))),
    ("array of 5", cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b"", b""]))),
    ("tag 98 (COSE_Sign)", cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""]))),
    ("nested depth bomb", b"\x81" * 600 + b"\x00"),
    ("tag depth bomb", b"\xc6" * 600 + b"\x00"),
    ("array depth bomb inside a map", b"\xa1\x00" + b"\x81" * 600 + b"\x00"),
    ("huge declared bstr", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff" + b"\0" * 20),
    ("huge declared bstr in the array", b"\xd2\x84\x5a\x7f\xff\xff\xff\x00\x01"),
    ("huge declared array", b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff\x00"),
    ("huge declared map", b"\xbb\x00\x00\x00\x00\xff\xff\xff\xff\x00"),
    ("lone break", b"\xff"),
    ("bad utf-8 text", b"\x62\xff\xfe"),
    ("bad simple value", b"\xf8\x01"),
    ("truncated", b"\xd2\x84\x43\xa1\x01"),
]


@pytest.mark.parametrize(("label", "cose"), CBOR_CASES, ids=[c[0] for c in CBOR_CASES])
def test_hostile_cbor_is_malformed(label: str, cose: bytes) -> None:
    assert refusal(encode(cose)) == "malformed", label


def test_depth_bomb_beyond_the_size_limit_is_too_large() -> None:
    assert refusal(encode(b"\x81" * 10000 + b"\x00")) == "too_large"


def _wrapped(tag: int) -> str:
    cose = base45.b45decode(mint(tagged=False)[4:])
    return encode(cbor2.dumps(cbor2.CBORTag(tag, cbor2.loads(cose))))


@pytest.mark.parametrize("tag", [98, 17, 16, 55799, 28, 256, 258])
def test_any_tag_but_18_is_refused(tag: int) -> None:
    # 55799, 28 and 256 are tags cbor2 would otherwise drop silently on decoding.
    assert refusal(_wrapped(tag)) == "malformed"
    assert verify(_wrapped(18)).cti == CTI


def test_tag_18_twice_is_refused() -> None:
    cose = base45.b45decode(mint()[4:])
    assert refusal(encode(cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(cose))))) == "malformed"


MALFORMED_STRUCTURES: list[tuple[str, dict[str, Any]]] = [
    ("alg -7 (ES256)", {"protected_map": {1: -7, 4: kid_of(QR_KEY)}}),
    ("alg as text", {"protected_map": {1: "EdDSA", 4: kid_of(QR_KEY)}}),
    ("alg missing", {"protected_map": {4: kid_of(QR_KEY)}}),
    ("kid of 7 bytes", {"protected_map": {1: -8, 4: kid_of(QR_KEY)[:7]}}),
    ("kid of 9 bytes", {"protected_map": {1: -8, 4: kid_of(QR_KEY) + b"\0"}}),
    ("kid as text", {"protected_map": {1: -8, 4: kid_of(QR_KEY).hex()}}),
    ("kid missing", {"protected_map": {1: -8}}),
    ("kid only unprotected", {"protected_map": {1: -8}, "unprotected": {4: kid_of(QR_KEY)}}),
    ("crit header", {"protected_map": {1: -8, 4: kid_of(QR_KEY), 2: [99]}}),
    ("float label for kid", {"protected_map": {1: -8, 4.0: kid_of(QR_KEY)}}),
    ("protected is a map, not a bstr", {"protected": {1: -8, 4: kid_of(QR_KEY)}}),
    ("protected bstr holds an array", {"protected": cbor2.dumps([1, -8])}),
    ("protected bstr is empty", {"protected": b""}),
    ("protected with trailing bytes",
     {"protected": cbor2.dumps({1: -8, 4: kid_of(QR_KEY)}) + b"\x00"}),
    ("unprotected is an array", {"unprotected": [1]}),
    ("unprotected is a bstr", {"unprotected": b""}),
    ("unprotected is undefined", {"unprotected": cbor2.undefined}),
    ("payload is a CBOR array", {"payload": cbor2.dumps([2, "L1"])}),
    ("payload nil (detached)", {"payload": cbor2.undefined}),
    ("payload is a map, not a bstr", {"payload": claims()}),
    ("payload with trailing bytes", {"payload": cbor2.dumps(claims()) + b"\x00"}),
    ("payload depth bomb", {"payload": b"\x81" * 500 + b"\x00"}),
    # The claims once more with sub repeated (same value): a map of 6 entries, one twice.
    ("payload duplicate key",
     {"payload": b"\xa6" + cbor2.dumps(claims())[1:] + cbor2.dumps(2) + cbor2.dumps("L1")}),
    ("signature as text", {"signature": "sig"}),
    ("trailing bytes after the COSE_Sign1", {"trailing": b"\x00"}),
]


@pytest.mark.parametrize(("label", "kwargs"), MALFORMED_STRUCTURES,
                         ids=[c[0] for c in MALFORMED_STRUCTURES])
def test_malformed_structure(label: str, kwargs: dict[str, Any]) -> None:
    assert refusal(build(**kwargs)) == "malformed", label


def test_detached_payload_as_null_is_malformed() -> None:
    protected = cbor2.dumps({1: -8, 4: kid_of(QR_KEY)})
    cose = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, None, b"\0" * 64]))
    assert refusal(encode(cose)) == "malformed"


MALFORMED_CLAIMS: list[tuple[str, dict[str, Any]]] = [
    ("sub missing", {"sub": DROP}),
    ("sub null", {"sub": None}),
    ("sub not a locker id", {"sub": "L 1"}),
    ("sub as bytes", {"sub": b"L1"}),
    ("exp missing", {"exp": DROP}),
    ("exp as text", {"exp": "2026-11-29T04:00:00Z"}),
    ("exp as bool", {"exp": True}),
    ("exp as float", {"exp": float(epoch(EXP))}),
    ("exp as tag 1", {"exp": cbor2.CBORTag(1, epoch(EXP))}),
    ("exp negative", {"exp": -1}),
    ("exp past year 9999", {"exp": 253402300800}),
    ("exp 2**64-1", {"exp": 2**64 - 1}),
    ("exp as bignum", {"exp": 2**64}),
    ("exp null", {"exp": None}),
    ("exp undefined", {"exp": cbor2.undefined}),
    ("compartment null", {"compartment": None}),
    ("cti null", {"cti": None}),
    ("nbf as text", {"nbf": "soon"}),
    ("nbf as bool", {"nbf": False}),
    ("cti missing", {"cti": DROP}),
    ("cti of 7 bytes", {"cti": b"\1" * 7}),
    ("cti of 17 bytes", {"cti": b"\1" * 17}),
    ("cti as text", {"cti": "0102030405060708"}),
    ("kind missing", {"kind": DROP}),
    ("kind admin", {"kind": "admin"}),
    ("kind as int", {"kind": 1}),
    ("compartment not an id", {"compartment": "7/8"}),
    ("compartment too long", {"compartment": "c" * 17}),
    ("compartment as int", {"compartment": 7}),
    ("parcel_id empty", {"parcel_id": ""}),
    ("parcel_id too long", {"parcel_id": "p" * 65}),
    ("parcel_id with a newline", {"parcel_id": "PX\n1"}),
    ("parcel_id as bytes", {"parcel_id": b"PX1"}),
]


@pytest.mark.parametrize(("label", "overrides"), MALFORMED_CLAIMS,
                         ids=[c[0] for c in MALFORMED_CLAIMS])
def test_malformed_claims(label: str, overrides: dict[str, Any]) -> None:
    assert refusal(build(claims_doc=claims(**overrides))) == "malformed", label


def test_text_claim_keys_do_not_stand_in_for_integer_ones() -> None:
    doc = claims(sub=DROP)
    doc["sub"] = "L1"
    assert refusal(build(claims_doc=doc)) == "malformed"


def test_malformed_is_reported_before_unknown_key() -> None:
    assert refusal(build(signer=CODES_KEY, claims_doc=claims(kind="admin"))) == "malformed"


# --- mutation and fuzzing --------------------------------------------------------------


def test_every_bit_flip_is_refused() -> None:
    text = mint(not_before=NOW - timedelta(minutes=1), parcel_id="PX123")
    cose = base45.b45decode(text[4:])
    reasons: set[str] = set()
    for index in range(len(cose)):
        for bit in range(8):
            altered = bytearray(cose)
            altered[index] ^= 1 << bit
            with pytest.raises(TrustError) as info:
                verify(encode(bytes(altered)))
            reasons.add(info.value.reason)
    # Flips land in the structure, the kid and the signed bytes alike.
    assert {"malformed", "unknown_key", "signature"} <= reasons


def test_every_truncation_is_refused() -> None:
    text = mint(parcel_id="PX123")
    for length in range(len(text)):
        with pytest.raises(TrustError):
            verify(text[:length])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes_are_refused_with_trust_error(data: bytes) -> None:
    with pytest.raises(TrustError):
        verify(encode(data))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_after_the_prefix_is_refused(text: str) -> None:
    with pytest.raises(TrustError):
        verify(QR_PREFIX + text)


_cbor_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats() | st.binary(max_size=20) | st.text(max_size=20))
_cbor_values = st.recursive(
    _cbor_leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.integers(-70000, 10) | st.text(max_size=3), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 18, 28, 35, 55799, 1000]), inner),
    max_leaves=10,
)
_claim_keys = st.sampled_from([2, 4, 5, 7, -65537, -65538, -65539, 6, 1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_claim_keys, _cbor_values, max_size=4), st.dictionaries(
    st.integers(-3, 5), _cbor_values, max_size=3))
def test_signed_tokens_with_arbitrary_claims_never_crash(
    overrides: dict[int, object], header_extra: dict[int, object]
) -> None:
    doc = claims()
    doc.update(overrides)
    header: dict[Any, Any] = {1: -8, 4: kid_of(QR_KEY)}
    header.update(header_extra)
    try:
        text = build(claims_doc=doc, protected_map=header)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        return  # hypothesis made something cbor2 cannot encode; nothing to decode
    try:
        token = verify(text)
    except TrustError:
        return
    # Whatever is accepted has the claim types the controller relies on.
    assert isinstance(token.locker_id, str) and token.locker_id == "L1"
    assert token.kind in QR_KINDS
    assert isinstance(token.cti, bytes) and 8 <= len(token.cti) <= 16
    assert token.expires_at.tzinfo is UTC


# --- peek and mint ---------------------------------------------------------------------


def test_peek_reads_without_a_key_but_refuses_malformed_input() -> None:
    token = peek_qr_token(mint(signer=CODES_KEY, parcel_id="PX9"))
    assert (token.locker_id, token.parcel_id, token.cti) == ("L1", "PX9", CTI)
    for text, reason in [("LK1:abc!!", "not_base45"), (build(claims_doc=claims(kind="x")),
                                                       "malformed")]:
        with pytest.raises(TrustError) as info:
            peek_qr_token(text)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"locker_id": "L 1"}, "locker id"),
        ({"kind": "admin"}, "kind"),
        ({"cti": b"\1" * 7}, "cti"),
        ({"cti": b"\1" * 17}, "cti"),
        ({"compartment": "7/8"}, "compartment"),
        ({"parcel_id": ""}, "parcel id"),
        ({"parcel_id": "p" * 65}, "parcel id"),
        ({"compartment": None}, "compartment or its parcel id"),
        ({"expires_at": datetime(2026, 11, 29, 4)}, "naive"),
        ({"not_before": EXP}, "earlier than the expiry"),
        ({"expires_at": datetime(1960, 1, 1, tzinfo=UTC)}, "out of range"),
    ],
)
def test_mint_validates_its_inputs(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(TrustError) as info:
        mint(**overrides)
    assert info.value.reason == "malformed"
    assert words in str(info.value)


def test_mint_rounds_towards_a_shorter_validity() -> None:
    token = verify(mint(expires_at=EXP + timedelta(milliseconds=900),
                        not_before=NOW - timedelta(seconds=10, milliseconds=900)),
                   now=NOW)
    assert token.expires_at == EXP
    assert token.not_before == NOW - timedelta(seconds=10)


def test_minted_tokens_are_short_enough_for_a_scanner() -> None:
    longest = mint(locker_id="L" * 64, compartment="c" * 16, parcel_id="p" * 64,
                   not_before=NOW, cti=b"\xff" * 16)
    assert len(longest) < MAX_QR_CHARS // 2
    assert verify(longest, locker_id="L" * 64).parcel_id == "p" * 64
