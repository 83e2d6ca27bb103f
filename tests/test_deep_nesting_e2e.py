"""Deeply nested JSON through the real paths: MQTT codes, keyring and cmd, the console pty."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from broker import Broker
from conftest import running, wait_until
from test_console import make_service, pty_console, token
from test_sync_mqtt import codes, mqtt_overrides, raw_publish, synced, watching

from lockerd.dev.provision import BankKit
from lockerd.timeutil import format_time, utcnow
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    TECHNICIAN_PAYLOAD_TYPE,
    sign_envelope,
)
from lockerd.trust.technician import encode_token

pytestmark = pytest.mark.e2e

# Far deeper than the decoders' recursion guard (about a thousand levels).
DEEP = 20_000
NESTED = b"[" * DEEP + b"]" * DEEP


def nested_in(doc: dict[str, object], field: str, nesting: bytes = NESTED) -> bytes:
    """`doc` as JSON with `field` holding `nesting`, a deeply nested array."""
    return json.dumps({**doc, field: "@"}).encode().replace(b'"@"', nesting)


def nested_envelope() -> bytes:
    return nested_in({"payloadType": CODES_PAYLOAD_TYPE, "payload": "e30=", "signatures": []},
                     "extra")


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return make_kit(codes(), parcels=["3", "4"], import_files=False,
                    overrides=mqtt_overrides(broker, max_payload_bytes=1024 * 1024))


@pytest.mark.parametrize("topic", ["keyring", "codes"])
async def test_nested_envelope_is_rejected_and_evented(kit: BankKit, broker: Broker,
                                                       topic: str) -> None:
    async with running(kit) as r:
        await synced(kit, broker, r)
        await raw_publish(broker, f"lockers/L1/{topic}", nested_envelope())
        ev = await r.wait_event("cache.rejected")
        assert (ev.data["what"], ev.data["reason"]) == (topic, "malformed")
        assert "nested too deeply" in ev.data["detail"]
        assert (r.app.codes.version(), r.app.cache.keyring_version) == (5, 1)
        assert not r.events("daemon.task_failed")


async def test_signed_bundle_with_a_nested_payload_is_rejected(kit: BankKit,
                                                              broker: Broker) -> None:
    now = utcnow()
    payload = nested_in({"type": "codes", "locker_id": "L1", "version": 9, "base_version": None,
                         "issued_at": format_time(now), "expires_at": format_time(now)},
                        "extra")
    async with running(kit) as r:
        await synced(kit, broker, r)
        await raw_publish(broker, "lockers/L1/codes",
                          sign_envelope(CODES_PAYLOAD_TYPE, payload, [kit.codes_key]))
        ev = await r.wait_event("cache.rejected")
        assert ev.data["reason"] == "malformed"
        assert r.app.codes.version() == 5


async def test_nested_commands_get_a_rejected_result(kit: BankKit, broker: Broker) -> None:
    now = utcnow()
    payload = nested_in({"type": "command", "cmd_id": "c-deep", "locker_id": "L1",
                         "issued_at": format_time(now), "expires_at": format_time(now),
                         "action": "selftest"}, "args", b'{"note": ' + NESTED + b"}")
    signed = sign_envelope(COMMAND_PAYLOAD_TYPE, payload, [kit.root_key])
    async with watching(broker) as w, running(kit) as r:
        await synced(kit, broker, r)
        for raw in (nested_envelope(), signed):
            await raw_publish(broker, "lockers/L1/cmd", raw)
        await wait_until(lambda: len(w.on("cmd/result")) >= 2, what="two refusals")
        # Neither cmd_id can be read out of such a document: the results carry an empty one.
        assert w.on("cmd/result") == [{"cmd_id": "", "status": "rejected",
                                       "detail": "malformed"}] * 2
        assert [e.data["reason"] for e in r.events("command.result")] == ["malformed"] * 2
        assert r.events("command.started") == []
        # A well-formed command still runs afterwards: the service is up.
        await raw_publish(broker, "lockers/L1/cmd", kit.command("clear_lockout", cmd_id="c-ok"))
        await wait_until(lambda: any(x["cmd_id"] == "c-ok" for x in w.on("cmd/result")),
                         what="result of c-ok")
        assert next(x for x in w.on("cmd/result") if x["cmd_id"] == "c-ok")["status"] == "ok"


async def test_nested_login_token_is_refused_and_the_session_goes_on(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    # Nesting that still fits in a login line (a token is at most 4096 characters).
    envelope = b'{"payloadType": "t", "x": ' + b"[" * 2_900 + b"]}"
    now = utcnow()
    payload = nested_in({"type": "technician", "tech_id": "t-9", "locker_ids": ["L1"],
                         "role": "operator", "issued_at": format_time(now),
                         "expires_at": format_time(now)}, "name", b"[" * 1_700)
    signed = encode_token(sign_envelope(TECHNICIAN_PAYLOAD_TYPE, payload, [kit.root_key]))
    async with running(kit) as r:
        factory = lambda url: make_service(r.app, kit, url, free_attempts=50)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            for bad in (encode_token(envelope), signed):
                assert len(bad) < 4090
                out = await t.run(f"login {bad}")
                assert "login refused (malformed)" in out, out
                assert "L1> " in out
            out = await t.run(f"login {token(kit)}", prompt=r"L1 t-17\(operator\)> $")
            assert "welcome" in out
        failed = [e.data["reason"] for e in r.events("console.login") if not e.data["ok"]]
        assert failed == ["malformed", "malformed"]
        assert not r.events("daemon.task_failed")
