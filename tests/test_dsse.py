"""DSSE envelopes and keys: PAE bytes, parsing, threshold verification, key files."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from trustkit import keys, raw_envelope, role, signature

from lockerd.errors import TrustError
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    RoleKeys,
    pae,
    parse_envelope,
    sign_envelope,
    verify_role,
    verify_threshold,
)
from lockerd.trust.keys import (
    generate_key,
    keyid_of,
    load_private_key,
    parse_public_hex,
    public_hex,
    save_private_key,
)

pytestmark = pytest.mark.unit

T = COMMAND_PAYLOAD_TYPE
PAYLOAD = b'{"type": "command", "cmd_id": "c-1"}'


@pytest.mark.parametrize(
    ("payload_type", "payload", "expected"),
    [
        (
            "http://example.com/HelloWorld",
            b"hello world",
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world",
        ),
        ("", b"", b"DSSEv1 0  0 "),
        ("t", b"0123456789", b"DSSEv1 1 t 10 0123456789"),
        ("\u00e9", b"x", b"DSSEv1 2 \xc3\xa9 1 x"),
        ("a b", b" \n\x00", b"DSSEv1 3 a b 3  \n\x00"),
        (
            "application/vnd.lockerd.codes+json",
            b"{}",
            b"DSSEv1 34 application/vnd.lockerd.codes+json 2 {}",
        ),
    ],
)
def test_pae_bytes(payload_type: str, payload: bytes, expected: bytes) -> None:
    assert pae(payload_type, payload) == expected


def test_signed_envelope_has_the_wire_shape() -> None:
    key = generate_key()
    raw = sign_envelope(T, PAYLOAD, [key])
    doc = json.loads(raw.decode("utf-8"))
    assert set(doc) == {"payloadType", "payload", "signatures"}
    assert doc["payloadType"] == T
    assert base64.b64decode(doc["payload"], validate=True) == PAYLOAD
    [sig] = doc["signatures"]
    assert sig["keyid"] == hashlib.sha256(bytes.fromhex(public_hex(key.public_key()))).hexdigest()
    sig_bytes = base64.b64decode(sig["sig"], validate=True)
    assert len(sig_bytes) == 64
    key.public_key().verify(sig_bytes, pae(T, PAYLOAD))


def test_sign_envelope_signs_once_per_distinct_key() -> None:
    key = generate_key()
    env = parse_envelope(sign_envelope(T, PAYLOAD, [key, key]))
    assert len(env.signatures) == 1


def test_parse_round_trip() -> None:
    a, b = keys(2)
    env = parse_envelope(sign_envelope(T, PAYLOAD, [a, b]))
    assert env.payload_type == T
    assert env.payload == PAYLOAD
    assert [keyid for keyid, _ in env.signatures] == [
        keyid_of(a.public_key()),
        keyid_of(b.public_key()),
    ]


def _verify(raw: bytes, signers: RoleKeys, expected_type: str = T) -> bytes:
    return verify_threshold(
        parse_envelope(raw),
        expected_type=expected_type,
        keys=signers.keys,
        threshold=signers.threshold,
    )


def test_threshold_met_by_distinct_authorised_keys() -> None:
    a, b, c = keys(3)
    assert _verify(sign_envelope(T, PAYLOAD, [a, c]), role([a, b, c], 2)) == PAYLOAD


def test_threshold_not_met() -> None:
    a, b, c = keys(3)
    with pytest.raises(TrustError) as err:
        _verify(sign_envelope(T, PAYLOAD, [a]), role([a, b, c], 2))
    assert err.value.reason == "signature"
    assert "2 needed" in str(err.value)


def test_duplicated_signature_counts_once() -> None:
    a, b = keys(2)
    sig = signature(a, T, PAYLOAD)
    raw = raw_envelope(T, PAYLOAD, [sig, sig])
    with pytest.raises(TrustError) as err:
        _verify(raw, role([a, b], 2))
    assert err.value.reason == "signature"
    assert _verify(raw, role([a, b], 1)) == PAYLOAD


def test_unknown_keyid_is_ignored() -> None:
    a, stranger = keys(2)
    raw = sign_envelope(T, PAYLOAD, [stranger, a])
    assert _verify(raw, role([a], 1)) == PAYLOAD
    with pytest.raises(TrustError) as err:
        _verify(sign_envelope(T, PAYLOAD, [stranger]), role([a], 1))
    assert err.value.reason == "signature"


def test_bad_signature_is_ignored_not_an_error() -> None:
    a, b = keys(2)
    keyid, sig = signature(a, T, PAYLOAD)
    broken = (keyid, bytes([sig[0] ^ 1]) + sig[1:])
    raw = raw_envelope(T, PAYLOAD, [broken, signature(b, T, PAYLOAD)])
    assert _verify(raw, role([a, b], 1)) == PAYLOAD
    with pytest.raises(TrustError) as err:
        _verify(raw, role([a, b], 2))
    assert err.value.reason == "signature"


def test_bad_then_good_signature_of_the_same_key_counts_once() -> None:
    a, b = keys(2)
    keyid, sig = signature(a, T, PAYLOAD)
    raw = raw_envelope(T, PAYLOAD, [(keyid, b"\x00" * 64), (keyid, sig)])
    assert _verify(raw, role([a, b], 1)) == PAYLOAD
    with pytest.raises(TrustError):
        _verify(raw, role([a, b], 2))


def test_signature_of_wrong_length_is_ignored() -> None:
    a, b = keys(2)
    raw = raw_envelope(T, PAYLOAD, [(keyid_of(a.public_key()), b"short"), signature(b, T, PAYLOAD)])
    assert _verify(raw, role([a, b], 1)) == PAYLOAD


def test_other_roles_key_is_not_counted() -> None:
    commands_key, codes_key = keys(2)
    raw = sign_envelope(T, PAYLOAD, [codes_key])
    with pytest.raises(TrustError) as err:
        _verify(raw, role([commands_key], 1))
    assert err.value.reason == "signature"


def test_keyid_claimed_by_another_key_is_not_counted() -> None:
    authorised, impostor = keys(2)
    _, sig = signature(impostor, T, PAYLOAD)
    raw = raw_envelope(T, PAYLOAD, [(keyid_of(authorised.public_key()), sig)])
    with pytest.raises(TrustError) as err:
        _verify(raw, role([authorised], 1))
    assert err.value.reason == "signature"


def test_signature_without_keyid_is_ignored() -> None:
    a = generate_key()
    sig = base64.b64encode(a.sign(pae(T, PAYLOAD))).decode()
    raw = json.dumps(
        {
            "payloadType": T,
            "payload": base64.b64encode(PAYLOAD).decode(),
            "signatures": [{"sig": sig}],
        }
    ).encode()
    with pytest.raises(TrustError) as err:
        _verify(raw, role([a], 1))
    assert err.value.reason == "signature"


def test_wrong_payload_type() -> None:
    a = generate_key()
    with pytest.raises(TrustError) as err:
        _verify(sign_envelope(CODES_PAYLOAD_TYPE, PAYLOAD, [a]), role([a], 1))
    assert err.value.reason == "payload_type"
    assert CODES_PAYLOAD_TYPE in str(err.value)


def test_payload_type_is_covered_by_the_signature() -> None:
    a = generate_key()
    doc = json.loads(sign_envelope(CODES_PAYLOAD_TYPE, PAYLOAD, [a]))
    doc["payloadType"] = T
    with pytest.raises(TrustError) as err:
        _verify(json.dumps(doc).encode(), role([a], 1))
    assert err.value.reason == "signature"


def test_payload_is_covered_by_the_signature() -> None:
    a = generate_key()
    doc = json.loads(sign_envelope(T, PAYLOAD, [a]))
    doc["payload"] = base64.b64encode(PAYLOAD + b" ").decode()
    with pytest.raises(TrustError) as err:
        _verify(json.dumps(doc).encode(), role([a], 1))
    assert err.value.reason == "signature"


def test_unknown_envelope_fields_are_ignored() -> None:
    a = generate_key()
    doc = json.loads(sign_envelope(T, PAYLOAD, [a]))
    doc["extra"] = {"x": 1}
    doc["signatures"][0]["comment"] = "hi"
    assert _verify(json.dumps(doc).encode(), role([a], 1)) == PAYLOAD


def test_zero_threshold_is_a_caller_bug() -> None:
    a = generate_key()
    env = parse_envelope(sign_envelope(T, PAYLOAD, [a]))
    with pytest.raises(ValueError):
        verify_threshold(env, expected_type=T, keys={}, threshold=0)


GOOD_SIG = base64.b64encode(b"\x01" * 64).decode()
GOOD_PAYLOAD = base64.b64encode(b"{}").decode()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "JSON"),
        (b"\xff\xfe{}", "JSON"),
        (b"[]", "object"),
        (b'{"payload": "e30=", "signatures": []}', "payloadType"),
        (b'{"payloadType": "t", "signatures": []}', "payload"),
        (b'{"payloadType": "t", "payload": "e30="}', "signatures"),
        (b'{"payloadType": 5, "payload": "e30=", "signatures": []}', "payloadType"),
        (b'{"payloadType": "t", "payload": "e30=", "signatures": {}}', "signatures"),
        (b'{"payloadType": "t", "payload": "!!!!", "signatures": []}', "payload"),
        (b'{"payloadType": "t", "payload": "e30", "signatures": []}', "payload"),
        (b'{"payloadType": "t", "payload": "e3-_", "signatures": []}', "payload"),
        (b'{"payloadType": "t", "payload": "\xc3\xa9", "signatures": []}', "payload"),
        (
            b'{"payloadType": "t", "payload": "e30=", "signatures": [{"keyid": 1, "sig": "'
            + GOOD_SIG.encode()
            + b'"}]}',
            "keyid",
        ),
        (
            b'{"payloadType": "t", "payload": "e30=", "signatures": [{"keyid": "k"}]}',
            "sig",
        ),
        (
            b'{"payloadType": "t", "payload": "e30=", "signatures": [{"keyid": "k", '
            b'"sig": "not base64"}]}',
            "signatures[0].sig",
        ),
    ],
)
def test_malformed_envelopes(raw: bytes, needle: str) -> None:
    with pytest.raises(TrustError) as err:
        parse_envelope(raw)
    assert err.value.reason == "malformed"
    assert needle in str(err.value)


@settings(max_examples=50, deadline=None)
@given(
    payload=st.binary(max_size=512),
    payload_type=st.text(min_size=1, max_size=40),
    n_signers=st.integers(min_value=1, max_value=3),
)
def test_sign_verify_round_trip(payload: bytes, payload_type: str, n_signers: int) -> None:
    signers = [Ed25519PrivateKey.generate() for _ in range(n_signers)]
    env = parse_envelope(sign_envelope(payload_type, payload, signers))
    assert env.payload == payload
    assert verify_role(env, expected_type=payload_type, role=role(signers, n_signers)) == payload


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(min_size=1, max_size=256), index=st.integers(min_value=0))
def test_any_flipped_payload_byte_is_refused(payload: bytes, index: int) -> None:
    key = Ed25519PrivateKey.generate()
    doc = json.loads(sign_envelope(T, payload, [key]))
    changed = bytearray(payload)
    changed[index % len(payload)] ^= 0x01
    doc["payload"] = base64.b64encode(bytes(changed)).decode()
    with pytest.raises(TrustError) as err:
        _verify(json.dumps(doc).encode(), role([key], 1))
    assert err.value.reason == "signature"


# --- RoleKeys -------------------------------------------------------------------------


def test_role_keys_from_hex_and_equality() -> None:
    a, b = keys(2)
    hexes = [public_hex(a.public_key()), public_hex(b.public_key())]
    first = RoleKeys.from_hex(hexes, 2)
    assert first.keyids == {keyid_of(a.public_key()), keyid_of(b.public_key())}
    assert first == RoleKeys.from_hex(list(reversed(hexes)), 2)
    assert first != RoleKeys.from_hex(hexes, 1)
    assert first != RoleKeys.from_hex(hexes[:1], 1)


@pytest.mark.parametrize("threshold", [0, -1, 3])
def test_role_keys_threshold_bounds(threshold: int) -> None:
    a, b = keys(2)
    with pytest.raises(ValueError, match="threshold"):
        RoleKeys.from_hex([public_hex(a.public_key()), public_hex(b.public_key())], threshold)


def test_role_keys_refuses_a_key_listed_twice() -> None:
    a = generate_key()
    with pytest.raises(ValueError, match="twice"):
        RoleKeys.from_hex([public_hex(a.public_key())] * 2, 1)


def test_role_keys_cannot_be_changed_through_the_callers_dict() -> None:
    a, b = keys(2)
    mapping = {keyid_of(a.public_key()): a.public_key()}
    trusted = RoleKeys(keys=mapping, threshold=1)
    mapping[keyid_of(b.public_key())] = b.public_key()
    assert len(trusted.keys) == 1


# --- keys -----------------------------------------------------------------------------


def test_keyid_is_sha256_of_raw_public_bytes() -> None:
    seed = bytes(range(32))
    key = Ed25519PrivateKey.from_private_bytes(seed)
    raw = bytes.fromhex(public_hex(key.public_key()))
    assert len(raw) == 32
    assert keyid_of(key.public_key()) == hashlib.sha256(raw).hexdigest()
    # RFC 8032 test 1 public key, so the hex form is checked against an outside value.
    rfc_seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    assert (
        public_hex(Ed25519PrivateKey.from_private_bytes(rfc_seed).public_key())
        == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("D75A980182B10AB7D54BFED3C964073A0EE172F3DAA62325AF021A68F707511A", "lowercase"),
        ("d75a98", "64"),
        ("zz" * 32, "64"),
        ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a\n", "64"),
    ],
)
def test_parse_public_hex_refuses(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_public_hex(text)


def test_private_key_file_round_trip(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "signer.key"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n")
    loaded = load_private_key(path)
    assert public_hex(loaded.public_key()) == public_hex(key.public_key())


def test_private_key_file_is_never_overwritten_silently(tmp_path: Path) -> None:
    path = tmp_path / "signer.key"
    first = generate_key()
    save_private_key(first, path)
    with pytest.raises(FileExistsError):
        save_private_key(generate_key(), path)
    assert public_hex(load_private_key(path).public_key()) == public_hex(first.public_key())
    second = generate_key()
    save_private_key(second, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_hex(load_private_key(path).public_key()) == public_hex(second.public_key())


def test_private_key_file_without_newline_loads(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("11" * 32)
    assert load_private_key(path)


@pytest.mark.parametrize(
    "content", [b"", b"11" * 31, b"11" * 32 + b"\n\n", b"xy" * 32, b" " + b"1" * 64]
)
def test_bad_private_key_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.key"):
        load_private_key(path)


def test_missing_private_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_private_key(tmp_path / "absent.key")
