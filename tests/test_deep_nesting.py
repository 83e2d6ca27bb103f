"""Deeply nested and random input to every parser of outside data: only its documented error."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trustkit import NOW, bundle_doc, keyring_doc, keys, role, wire_time

from lockerd import jsonsafe
from lockerd.config import load_config
from lockerd.errors import ConfigError, TrustError
from lockerd.services.outbox import _parse_ack
from lockerd.trust.bundle import verify_bundle
from lockerd.trust.command import peek_cmd_id, verify_command
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    TECHNICIAN_PAYLOAD_TYPE,
    parse_envelope,
    sign_envelope,
)
from lockerd.trust.keyring import accept_keyring
from lockerd.trust.technician import encode_token, verify_technician

pytestmark = pytest.mark.unit

KEY = keys(1)
ROLE = role(KEY)
LATER = NOW + timedelta(days=30)
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Well past any decoder's recursion guard, yet small: a few kilobytes per thousand levels.
DEEP = 100_000
_OPENERS = ((b"[", b"]"), (b'{"a":', b"}"), (b"[1,", b"]"), (b'{"payload":[', b"]}"))
_CORES = (b"", b"1", b'"x"', b"[]", b"{}", b"null", b'"\\"[{"')


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """Arrays and objects nested up to DEEP levels, closed or left open."""
    depth = draw(st.one_of(st.integers(0, 2_000), st.integers(0, DEEP)))
    pattern = draw(st.lists(st.sampled_from(_OPENERS), min_size=1, max_size=3))
    core = draw(st.sampled_from(_CORES))
    openers = b"".join(pattern[i % len(pattern)][0] for i in range(depth))
    closers = b"".join(pattern[i % len(pattern)][1] for i in reversed(range(depth)))
    return openers + core + (closers if draw(st.booleans()) else b"")


def _with(doc: dict[str, Any], field: str, value: bytes) -> bytes:
    """`doc` as JSON with `field` (known or not) set to the raw JSON `value`."""
    marker = "\x00marker\x00"
    text = json.dumps({**doc, field: marker}).encode()
    return text.replace(json.dumps(marker).encode(), value)


def documents(template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Random bytes, bare nesting, and `template` with nesting in a known or unknown field."""
    fields = st.sampled_from([*template, "extra"])
    return st.one_of(
        st.binary(max_size=2048),
        nested(),
        st.builds(lambda f, v: _with(template, f, v), fields, nested()),
    )


def envelope_with(payload_type: str, field: str, value: bytes) -> bytes:
    base = {"payloadType": payload_type, "payload": base64.b64encode(b"{}").decode(),
            "signatures": [{"keyid": "k", "sig": base64.b64encode(b"\x01" * 64).decode()}]}
    return _with(base, field, value)


def envelopes(payload_type: str, template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Hostile envelopes, and envelopes correctly signed by KEY around a hostile payload."""
    return st.one_of(
        documents({"payloadType": payload_type, "payload": "e30=", "signatures": []}),
        st.builds(lambda f, v: envelope_with(payload_type, f, v),
                  st.sampled_from(["payloadType", "payload", "signatures", "extra"]), nested()),
        documents(template).map(lambda p: sign_envelope(payload_type, p, KEY)),
    )


def only_trust_error(call: Callable[[], object]) -> None:
    try:
        call()
    except TrustError as exc:
        assert exc.reason and str(exc)


COMMAND = {"type": "command", "cmd_id": "c-1", "locker_id": "L1",
           "issued_at": wire_time(NOW - timedelta(minutes=1)),
           "expires_at": wire_time(NOW + timedelta(minutes=5)), "action": "selftest", "args": {}}
TECHNICIAN = {"type": "technician", "tech_id": "t-1", "name": "A. Tech", "locker_ids": ["L1"],
              "role": "viewer", "issued_at": wire_time(NOW - timedelta(minutes=1)),
              "expires_at": wire_time(NOW + timedelta(hours=1))}
KEYRING = keyring_doc(version=3, root=KEY, others=KEY)
BUNDLE = bundle_doc()


@FUZZ
@given(raw=envelopes(CODES_PAYLOAD_TYPE, {}))
@example(raw=b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}")
def test_parse_envelope(raw: bytes) -> None:
    only_trust_error(lambda: parse_envelope(raw))


@FUZZ
@given(raw=envelopes(KEYRING_PAYLOAD_TYPE, KEYRING))
@example(raw=sign_envelope(KEYRING_PAYLOAD_TYPE, _with(KEYRING, "codes", b"[" * DEEP), KEY))
def test_accept_keyring(raw: bytes) -> None:
    only_trust_error(lambda: accept_keyring(raw, trusted_root=ROLE, current_version=1, now=NOW))


@FUZZ
@given(raw=envelopes(CODES_PAYLOAD_TYPE, BUNDLE))
@example(raw=sign_envelope(CODES_PAYLOAD_TYPE, _with(BUNDLE, "upsert", b"[" * DEEP), KEY))
def test_verify_bundle(raw: bytes) -> None:
    only_trust_error(lambda: verify_bundle(raw, codes_role=ROLE, keyring_expires_at=LATER,
                                           locker_id="L1", held_version=3, now=NOW))


@FUZZ
@given(raw=envelopes(COMMAND_PAYLOAD_TYPE, COMMAND))
@example(raw=sign_envelope(COMMAND_PAYLOAD_TYPE, _with(COMMAND, "args", b"[" * DEEP), KEY))
def test_verify_command_and_peek_cmd_id(raw: bytes) -> None:
    only_trust_error(lambda: verify_command(raw, commands_role=ROLE, keyring_expires_at=LATER,
                                            locker_id="L1", now=NOW))
    cmd_id = peek_cmd_id(raw)
    assert cmd_id is None or isinstance(cmd_id, str)


@FUZZ
@given(raw=envelopes(TECHNICIAN_PAYLOAD_TYPE, TECHNICIAN),
       as_text=st.text(max_size=64))
@example(raw=b'{"x": ' + b"[" * 3_000, as_text="")
def test_verify_technician(raw: bytes, as_text: str) -> None:
    for token in (encode_token(raw), as_text):
        only_trust_error(partial(verify_technician, token, technicians_role=ROLE,
                                 keyring_expires_at=LATER, locker_id="L1", now=NOW))


@FUZZ
@given(raw=documents({"upto_seq": 5}))
@example(raw=b'{"upto_seq": 5, "x": ' + b"{}" * 10 + b"[" * DEEP + b"]" * DEEP + b"}")
def test_events_ack_parser(raw: bytes) -> None:
    upto = _parse_ack(raw)
    assert upto is None or (isinstance(upto, int) and upto >= 0)


@FUZZ
@given(raw=documents({"a": 1}))
def test_jsonsafe_raises_only_its_error(raw: bytes) -> None:
    for decode in (jsonsafe.loads, lambda r: jsonsafe.decode(r, type=dict[str, int])):
        try:
            decode(raw)
        except jsonsafe.JsonInputError as exc:
            assert str(exc)


def test_jsonsafe_names_deep_nesting() -> None:
    deep = b"[" * DEEP + b"]" * DEEP
    for decode in (jsonsafe.loads, lambda r: jsonsafe.decode(r, type=list[Any])):
        with pytest.raises(jsonsafe.JsonInputError, match="nested too deeply"):
            decode(deep)


@pytest.mark.parametrize("nesting", ["[" * 5_000 + "]" * 5_000, "{b=" * 5_000 + "1" + "}" * 5_000])
def test_config_nested_too_deeply_is_a_config_error(tmp_path: Path, nesting: str) -> None:
    path = tmp_path / "lockerd.toml"
    path.write_text(f"a = {nesting}\n")
    with pytest.raises(ConfigError, match="nested too deeply") as err:
        load_config(path)
    assert str(path) in str(err.value)
