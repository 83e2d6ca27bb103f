"""Signed QR tokens (PROTOCOL section 9): `LK1:` + base45 of an Ed25519 COSE_Sign1 of CWT claims.

A COSE_Sign1 carries exactly one signature, so the qr role's threshold cannot be met by more
than one key: a token is accepted on ONE valid signature of a key of the qr role, whatever
the threshold the keyring gives that role. Whether a token's cti was already spent is not
checked here: the daemon keeps spent cti values in its database.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import base45  # type: ignore[import-untyped]  # no type hints shipped
import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from lockerd.errors import TrustError
from lockerd.ids import QR_TOKEN_PREFIX
from lockerd.ids import is_qr_token as is_qr_token  # re-exported: its users import it here
from lockerd.timeutil import format_time
from lockerd.trust.bundle import is_compartment_id, is_locker_id
from lockerd.trust.dsse import RoleKeys
from lockerd.trust.keys import keyid_of

QR_PREFIX = QR_TOKEN_PREFIX
MAX_QR_CHARS = 1024
QR_KINDS = ("pickup", "deposit", "courier")

COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
KID_BYTES = 8
CTI_MIN_BYTES = 8
CTI_MAX_BYTES = 16
MAX_PARCEL_ID = 64
SIGNATURE_BYTES = 64

# COSE header labels (RFC 9052) and CWT claim keys (RFC 8392, private claims of section 9).
_HDR_ALG = 1
_HDR_CRIT = 2
_HDR_KID = 4
_CLAIM_SUB = 2
_CLAIM_EXP = 4
_CLAIM_NBF = 5
_CLAIM_CTI = 7
_CLAIM_KIND = -65537
_CLAIM_COMPARTMENT = -65538
_CLAIM_PARCEL_ID = -65539

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# 9999-12-31T23:59:59Z: the last second a datetime can hold.
_MAX_NUMERIC_DATE = 253402300799

# Tags cbor2 would otherwise turn into Python objects. Some of them (55799, 256, 28) vanish
# on decoding, which would let a wrapper tag around the COSE_Sign1 through; others run
# parsers (regular expressions, MIME, dates) on input nobody has verified yet. Decoding them
# as plain CBORTag values keeps every tag visible, and any tag where a claim is expected is
# then simply a wrong type.
_SEMANTIC_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260,
                  261, 1004, 55799)

# What cbor2 may raise on hostile input. cbor2 6 wraps most failures in CBORDecodeError;
# the rest are listed so that nothing but TrustError leaves this module.
_CBOR_ERRORS: tuple[type[BaseException], ...] = (
    cbor2.CBORError, ValueError, TypeError, LookupError, ArithmeticError, EOFError,
    RecursionError, MemoryError,
)


def _keep_tag(tag: int) -> Callable[[Any, bool], Any]:
    def decode(value: Any, immutable: bool) -> Any:
        return cbor2.CBORTag(tag, value)

    return decode


_RAW_TAGS: Mapping[int, Callable[[Any, bool], Any]] = {tag: _keep_tag(tag)
                                                       for tag in _SEMANTIC_TAGS}


@dataclass(frozen=True, slots=True)
class QrToken:
    """The claims of a QR token. Trusted only when it came from `decode_qr_token` or
    `verify_qr_token`; `peek_qr_token` gives the same shape without any signature check."""

    cti: bytes
    kind: str
    locker_id: str
    expires_at: datetime
    not_before: datetime | None
    compartment: str | None
    parcel_id: str | None
    kid: bytes

    @property
    def cti_hex(self) -> str:
        """The token id as lowercase hex: `data.cti` of the events it causes."""
        return self.cti.hex()


@dataclass(frozen=True, slots=True)
class _Sign1:
    """A structurally valid COSE_Sign1, not verified yet."""

    protected: bytes
    payload: bytes
    signature: bytes
    token: QrToken


def _malformed(message: str) -> TrustError:
    return TrustError(f"malformed QR token: {message}", reason="malformed")


def _cbor_item(data: bytes, *, what: str) -> Any:
    """Decode exactly one CBOR item; anything wrong, trailing bytes included, is malformed."""
    fp = io.BytesIO(data)
    # Built outside the try: a cbor2 older than 6.1 lacks these options, and that must fail
    # loudly rather than turn every token into "malformed".
    decoder = cbor2.CBORDecoder(fp, semantic_decoders=_RAW_TAGS, allow_duplicate_keys=False)
    try:
        value = decoder.decode()
    except _CBOR_ERRORS as exc:
        raise _malformed(f"{what} is not valid CBOR ({exc})") from exc
    extra = len(data) - fp.tell()
    if extra:
        raise _malformed(f"{extra} byte(s) after the end of the {what}")
    return value


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but a CBOR true is not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _int_keyed(value: Mapping[Any, Any]) -> dict[int, Any]:
    # Only integer labels are looked at; a float key 2.0 would otherwise compare equal to 2.
    return {key: item for key, item in value.items() if _is_int(key)}


def _decode_text(text: str) -> bytes:
    if len(text) > MAX_QR_CHARS:
        raise TrustError(f"QR token of {len(text)} characters refused: at most {MAX_QR_CHARS} "
                         "are read", reason="too_large")
    if not text.startswith(QR_PREFIX):
        raise TrustError(f"QR token must start with {QR_PREFIX!r}", reason="not_base45")
    try:
        raw: bytes = base45.b45decode(text[len(QR_PREFIX):])
    except ValueError as exc:
        raise TrustError(f"QR token: the text after {QR_PREFIX!r} is not base45 (RFC 9285: "
                         "digits, capital letters and ' $%*+-./:' in groups of 2 or 3)",
                         reason="not_base45") from exc
    return raw


def _numeric_date(claims: Mapping[int, Any], key: int, name: str) -> datetime | None:
    if key not in claims:
        return None
    value = claims[key]
    if not _is_int(value):
        raise _malformed(f"{name} must be an integer number of seconds since the epoch, "
                         f"got {type(value).__name__}")
    if not 0 <= value <= _MAX_NUMERIC_DATE:
        raise _malformed(f"{name} {value} is out of range (0 to {_MAX_NUMERIC_DATE})")
    return _EPOCH + timedelta(seconds=value)


def _optional_text(claims: Mapping[int, Any], key: int, name: str) -> str | None:
    if key not in claims:
        return None
    value = claims[key]
    if not isinstance(value, str):
        raise _malformed(f"{name} must be text, got {type(value).__name__}")
    return value


def _parse_claims(payload: bytes, kid: bytes) -> QrToken:
    raw = _cbor_item(payload, what="payload")
    if not isinstance(raw, Mapping):
        raise _malformed(f"the payload must be a CBOR map of CWT claims, got "
                         f"{type(raw).__name__}")
    claims = _int_keyed(raw)
    if _CLAIM_SUB not in claims:
        raise _malformed("claim 2 (sub, the locker id) is missing")
    sub = claims[_CLAIM_SUB]
    if not isinstance(sub, str) or not is_locker_id(sub):
        raise _malformed("claim 2 (sub) must be a locker id: 1-64 characters of "
                         "A-Z a-z 0-9 _ -")
    expires_at = _numeric_date(claims, _CLAIM_EXP, "claim 4 (exp)")
    if expires_at is None:
        raise _malformed("claim 4 (exp) is missing: a token must expire")
    not_before = _numeric_date(claims, _CLAIM_NBF, "claim 5 (nbf)")
    if _CLAIM_CTI not in claims:
        raise _malformed("claim 7 (cti, the token id) is missing")
    cti = claims[_CLAIM_CTI]
    if not isinstance(cti, bytes) or not CTI_MIN_BYTES <= len(cti) <= CTI_MAX_BYTES:
        raise _malformed(f"claim 7 (cti) must be {CTI_MIN_BYTES}-{CTI_MAX_BYTES} bytes")
    kind = _optional_text(claims, _CLAIM_KIND, "claim -65537 (kind)")
    if kind is None:
        raise _malformed("claim -65537 (kind) is missing")
    if kind not in QR_KINDS:
        raise _malformed(f"kind {kind[:40]!r} is not one of {', '.join(QR_KINDS)}")
    compartment = _optional_text(claims, _CLAIM_COMPARTMENT, "claim -65538 (compartment)")
    if compartment is not None and not is_compartment_id(compartment):
        raise _malformed("claim -65538 (compartment) must be 1-16 characters of A-Z a-z 0-9 -")
    parcel_id = _optional_text(claims, _CLAIM_PARCEL_ID, "claim -65539 (parcel_id)")
    if parcel_id is not None and not _is_parcel_id(parcel_id):
        raise _malformed(f"claim -65539 (parcel_id) must be 1-{MAX_PARCEL_ID} printable "
                         "characters")
    return QrToken(cti=cti, kind=kind, locker_id=sub, expires_at=expires_at,
                   not_before=not_before, compartment=compartment, parcel_id=parcel_id, kid=kid)


def _is_parcel_id(text: str) -> bool:
    return 1 <= len(text) <= MAX_PARCEL_ID and text.isprintable()


def _parse_protected(protected: bytes) -> bytes:
    """Check the protected header and return its kid."""
    if not protected:
        raise _malformed("the protected header is empty: it must hold alg and kid")
    header = _cbor_item(protected, what="protected header")
    if not isinstance(header, Mapping):
        raise _malformed(f"the protected header must be a CBOR map, got "
                         f"{type(header).__name__}")
    params = _int_keyed(header)
    if _HDR_CRIT in params:
        raise _malformed("critical header parameters (label 2) are not supported")
    alg = params.get(_HDR_ALG)
    if not _is_int(alg) or alg != ALG_EDDSA:
        raise _malformed(f"alg (label 1) must be {ALG_EDDSA} (EdDSA), got {alg!r:.40}")
    if _HDR_KID not in params:
        raise _malformed("kid (label 4) is missing from the protected header")
    kid = params[_HDR_KID]
    if not isinstance(kid, bytes) or len(kid) != KID_BYTES:
        raise _malformed(f"kid (label 4) must be {KID_BYTES} bytes, the start of the "
                         "signer's keyid")
    return kid


def _parse(text: str) -> _Sign1:
    """Every structural check, in the order of the refusal reasons; nothing is verified."""
    item = _cbor_item(_decode_text(text), what="COSE_Sign1")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise _malformed(f"CBOR tag {item.tag}, expected {COSE_SIGN1_TAG} (COSE_Sign1) "
                             "or no tag")
        item = item.value
    if not isinstance(item, list | tuple) or len(item) != 4:
        shape = f"an array of {len(item)}" if isinstance(item, list | tuple) else \
            type(item).__name__
        raise _malformed(f"a COSE_Sign1 is an array of 4 items, got {shape}")
    protected, unprotected, payload, signature = item
    if not isinstance(protected, bytes):
        raise _malformed("the protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise _malformed("the unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise _malformed("the payload must be a byte string (a detached payload is not "
                         "accepted)")
    if not isinstance(signature, bytes):
        raise _malformed("the signature must be a byte string")
    kid = _parse_protected(protected)
    token = _parse_claims(payload, kid)
    return _Sign1(protected=protected, payload=payload, signature=signature, token=token)


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def _kid_of(public: Ed25519PublicKey) -> bytes:
    return bytes.fromhex(keyid_of(public))[:KID_BYTES]


def peek_qr_token(text: str) -> QrToken:
    """The claims of a token WITHOUT verifying its signature: for display only.

    Malformed input is refused exactly as `decode_qr_token` refuses it (TrustError), but
    nothing returned here may grant anything.
    """
    return _parse(text).token


def decode_qr_token_with_signer(text: str, *, qr_role: RoleKeys) -> tuple[QrToken, str]:
    """`decode_qr_token`, also returning the keyid of the qr key whose signature verified."""
    sign1 = _parse(text)
    kid = sign1.token.kid
    # kid is a hint of 8 bytes: several keys may share it, so each one is tried.
    candidates = [(keyid, key) for keyid, key in sorted(qr_role.keys.items())
                  if bytes.fromhex(keyid)[:KID_BYTES] == kid]
    if not candidates:
        raise TrustError(f"QR token signed by key {kid.hex()}…, which is not a key of the qr "
                         "role", reason="unknown_key")
    if len(sign1.signature) == SIGNATURE_BYTES:
        message = _sig_structure(sign1.protected, sign1.payload)
        for keyid, key in candidates:
            try:
                key.verify(sign1.signature, message)
            except InvalidSignature:
                continue
            return sign1.token, keyid
    raise TrustError(f"QR token signature does not verify with the qr key {kid.hex()}…",
                     reason="signature")


def decode_qr_token(text: str, *, qr_role: RoleKeys) -> QrToken:
    """Check a token's structure and its signature by a qr-role key; not its times or locker.

    Reasons: too_large, not_base45, malformed, unknown_key, signature.
    """
    return decode_qr_token_with_signer(text, qr_role=qr_role)[0]


def verify_qr_token(
    text: str,
    *,
    qr_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    now: datetime,
) -> QrToken:
    """A token this locker may act on now, its cti not yet checked against the spent ones.

    Reasons, in the order checked: too_large, not_base45, malformed, unknown_key, signature,
    keyring_expired, wrong_locker, expired, not_yet_valid.
    """
    token = decode_qr_token(text, qr_role=qr_role)
    check_qr_token(token, keyring_expires_at=keyring_expires_at, locker_id=locker_id, now=now)
    return token


def check_qr_token(
    token: QrToken, *, keyring_expires_at: datetime, locker_id: str, now: datetime
) -> None:
    """The checks of `verify_qr_token` after the signature, on a token `decode_qr_token`
    returned. Reasons, in order: keyring_expired, wrong_locker, expired, not_yet_valid."""
    if now >= keyring_expires_at:
        raise TrustError("the keyring has expired: no QR token is accepted until a fresh "
                         "keyring arrives", reason="keyring_expired")
    if token.locker_id != locker_id:
        raise TrustError(f"QR token is for locker {token.locker_id}, this is {locker_id}",
                         reason="wrong_locker")
    if now >= token.expires_at:
        raise TrustError(f"QR token expired at {format_time(token.expires_at)}",
                         reason="expired")
    if token.not_before is not None and now < token.not_before:
        raise TrustError(f"QR token is not valid before {format_time(token.not_before)}",
                         reason="not_yet_valid")


def _seconds(dt: datetime, *, name: str, round_up: bool) -> int:
    if dt.tzinfo is None:
        raise _malformed(f"{name} is a naive datetime; give an aware UTC time")
    seconds = (dt - _EPOCH).total_seconds()
    whole = math.ceil(seconds) if round_up else math.floor(seconds)
    if not 0 <= whole <= _MAX_NUMERIC_DATE:
        raise _malformed(f"{name} {format_time(dt)} is out of range")
    return whole


def mint_qr_token(
    *,
    signer: Ed25519PrivateKey,
    locker_id: str,
    kind: str,
    cti: bytes,
    expires_at: datetime,
    not_before: datetime | None = None,
    compartment: str | None = None,
    parcel_id: str | None = None,
    tagged: bool = True,
) -> str:
    """Sign a token with one qr-role key and return its text, `LK1:` + base45.

    exp is rounded down and nbf up to whole seconds, so the token is never valid for longer
    than asked. Bad inputs raise TrustError(reason="malformed") naming the input.
    """
    if not is_locker_id(locker_id):
        raise _malformed(f"locker id {locker_id!r} is not 1-64 characters of A-Z a-z 0-9 _ -")
    if kind not in QR_KINDS:
        raise _malformed(f"kind {kind!r} is not one of {', '.join(QR_KINDS)}")
    if not isinstance(cti, bytes) or not CTI_MIN_BYTES <= len(cti) <= CTI_MAX_BYTES:
        raise _malformed(f"cti must be {CTI_MIN_BYTES}-{CTI_MAX_BYTES} bytes")
    if compartment is not None and not is_compartment_id(compartment):
        raise _malformed(f"compartment {compartment!r} is not 1-16 characters of A-Z a-z 0-9 -")
    if parcel_id is not None and not _is_parcel_id(parcel_id):
        raise _malformed(f"parcel id must be 1-{MAX_PARCEL_ID} printable characters")
    if kind == "pickup" and compartment is None and parcel_id is None:
        raise _malformed("a pickup token must name its compartment or its parcel id")
    exp = _seconds(expires_at, name="expiry", round_up=False)
    claims: dict[int, object] = {_CLAIM_SUB: locker_id, _CLAIM_EXP: exp}
    if not_before is not None:
        nbf = _seconds(not_before, name="not-before", round_up=True)
        if nbf >= exp:
            raise _malformed("not-before must be earlier than the expiry")
        claims[_CLAIM_NBF] = nbf
    claims[_CLAIM_CTI] = cti
    claims[_CLAIM_KIND] = kind
    if compartment is not None:
        claims[_CLAIM_COMPARTMENT] = compartment
    if parcel_id is not None:
        claims[_CLAIM_PARCEL_ID] = parcel_id
    protected = cbor2.dumps({_HDR_ALG: ALG_EDDSA, _HDR_KID: _kid_of(signer.public_key())})
    payload = cbor2.dumps(claims)
    signature = signer.sign(_sig_structure(protected, payload))
    sign1: list[object] = [protected, {}, payload, signature]
    cose = cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, sign1) if tagged else sign1)
    encoded: bytes = base45.b45encode(cose)
    text = QR_PREFIX + encoded.decode("ascii")
    if len(text) > MAX_QR_CHARS:
        raise _malformed(f"the token would be {len(text)} characters, more than the "
                         f"{MAX_QR_CHARS} a locker reads")
    # What is written must be what a locker reads back.
    _parse(text)
    return text
