"""Help at the bank end to end (PROTOCOL section 12): the daemon, the suite's own Mosquitto,
the simulated keypad and display. Replies are checked (each refusal evented and never
shown), a request made offline reaches the backend when the broker returns, and the hourly
limit holds across a restart."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from conftest import Running, running, stored_events, wait_until
from test_outbox import Backend
from test_sync_mqtt import mqtt_overrides, publish, raw_publish

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.timeutil import utcnow
from lockerd.trust.keys import generate_key

pytestmark = pytest.mark.e2e

REPLY_TOPIC = "lockers/L1/help/reply"


def _kit(make_kit: Callable[..., BankKit], broker: Broker, **help_: Any) -> BankKit:
    overrides: dict[str, Any] = mqtt_overrides(broker)
    overrides["help"] = {"support_text": "Call 0800 123 456", **help_}
    return make_kit([PlainCode("p-1", "482913", "3", parcel_id="PX1")], parcels=["3"],
                    overrides=overrides)


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return _kit(make_kit, broker, reply_timeout_s=60)


async def connected(r: Running) -> None:
    assert r.app.link is not None
    await asyncio.wait_for(r.app.link.subscribed.wait(), 10)


async def ask_help(r: Running, *, count: int = 1) -> dict[str, Any]:
    """A customer asks for help on the keypad; the recorded request's data."""
    r.world.press("#")
    await wait_until(lambda: "Tracking number?" in r.display(), what="tracking prompt")
    r.world.press("12345#9876")
    event = await r.wait_event("help.requested", count=count)
    return dict(event.data)


def _unsigned(kit: BankKit, help_id: str) -> bytes:
    env = json.loads(kit.help_reply(help_id))
    env["signatures"] = []
    return json.dumps(env).encode()


REFUSALS: dict[str, tuple[str, Callable[[BankKit, str], bytes]]] = {
    "unsigned": ("unsigned", _unsigned),
    "signed by the codes role": ("wrong_role", lambda k, h: k.help_reply(
        h, signer=k.codes_key)),
    "signed by an unknown key": ("signature", lambda k, h: k.help_reply(
        h, signer=generate_key())),
    "expired": ("expired", lambda k, h: k.help_reply(
        h, expires_at=utcnow() - timedelta(seconds=1))),
    "for another locker": ("wrong_locker", lambda k, h: k.help_reply(h, locker_id="L2")),
    "for an unknown help_id": ("unknown_help_id", lambda k, h: k.help_reply(
        "7d0bfe43-5a0e-4f7e-9a51-000000000000")),
    "not a help reply": ("payload_type", lambda k, h: k.command("clear_lockout")),
    "garbage": ("malformed", lambda k, h: b"{\xff"),
}


async def test_a_signed_reply_is_recorded_and_shown(kit: BankKit, broker: Broker) -> None:
    async with running(kit) as r:
        await connected(r)
        data = await ask_help(r)
        assert set(data) == {"help_id", "reference", "tracking", "phone_last4"}
        assert (data["tracking"], data["phone_last4"]) == ("12345", "9876")
        await wait_until(lambda: "Checking..." in r.display(), what="checking screen")
        assert f"Ref H-{data['reference']}" in r.display()
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        answered = await r.wait_event("help.answered")
        assert dict(answered.data) == {"help_id": data["help_id"], "outcome": "resent"}
        await wait_until(lambda: "New code sent by SMS" in r.display(), what="reply shown")
        assert r.world.pulses == []


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_refused_reply_is_evented_and_never_shown(kit: BankKit, broker: Broker,
                                                          case: str) -> None:
    reason, make = REFUSALS[case]
    async with running(kit) as r:
        await connected(r)
        data = await ask_help(r)
        await wait_until(lambda: "Checking..." in r.display(), what="checking screen")
        await raw_publish(broker, REPLY_TOPIC, make(kit, data["help_id"]))
        rejected = await r.wait_event("help.reply_rejected")
        assert rejected.data["reason"] == reason
        assert "Checking..." in r.display()
        assert r.events("help.answered") == []
        # The daemon is still up and the request still open: a good reply is shown.
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        await wait_until(lambda: "New code sent by SMS" in r.display(), what="reply shown")


async def test_a_second_reply_to_the_same_request_is_refused(kit: BankKit,
                                                            broker: Broker) -> None:
    async with running(kit) as r:
        await connected(r)
        data = await ask_help(r)
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        await r.wait_event("help.answered")
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(
            data["help_id"], message="Call 0900 666 666 now"))
        rejected = await r.wait_event("help.reply_rejected")
        assert rejected.data["reason"] == "already_answered"
        assert "0900" not in r.display()


async def test_a_late_reply_is_accepted_but_not_shown(make_kit: Callable[..., BankKit],
                                                      broker: Broker) -> None:
    kit = _kit(make_kit, broker, reply_timeout_s=0.2)
    async with running(kit) as r:
        await connected(r)
        data = await ask_help(r)
        await wait_until(lambda: "No reply yet" in r.display(), what="timeout screen")
        assert f"Ref H-{data['reference']}" in r.display()
        assert "Call 0800 123 456" in r.display()
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        await r.wait_event("help.answered")
        assert "New code sent" not in r.display()


async def test_offline_the_request_is_queued_and_sent_when_the_broker_returns(
        make_kit: Callable[..., BankKit], bank_dir: Path) -> None:
    d = bank_dir / "pbroker"
    d.mkdir()
    broker = Broker(d, persistence=True)
    broker.start()
    try:
        kit = _kit(make_kit, broker)
        async with Backend(broker, ack=False):
            pass  # the backend's persistent session now queues what it misses
        async with running(kit) as r:
            await connected(r)
            broker.stop()
            assert r.app.link is not None
            await asyncio.wait_for(r.app.link.disconnected.wait(), 10)
            data = await ask_help(r)
            await wait_until(lambda: "Offline: saved" in r.display(), what="offline screen")
            assert f"Ref H-{data['reference']}" in r.display()
            assert "Call 0800 123 456" in r.display()
            broker.start()
            async with Backend(broker, ack=True) as backend:
                await wait_until(lambda: any(e["type"] == "help.requested"
                                             for e in backend.events),
                                 timeout=15, what="help.requested delivered")
                await wait_until(lambda: r.app.outbox.depth() == 0, timeout=15,
                                 what="all acknowledged")
        [sent] = {e["seq"]: e for e in backend.events if e["type"] == "help.requested"}.values()
        assert sent["data"] == data
    finally:
        broker.stop()


async def test_the_hourly_limit_holds_across_a_restart(make_kit: Callable[..., BankKit],
                                                       broker: Broker) -> None:
    kit = _kit(make_kit, broker, max_per_hour=1)
    async with running(kit) as r:
        await connected(r)
        await ask_help(r)
    async with running(kit) as r:
        await connected(r)
        r.world.press("#")
        await wait_until(lambda: "Tracking number?" in r.display(), what="tracking prompt")
        r.world.press("12345#9876")
        await wait_until(lambda: "Help is busy" in r.display(), what="limit screen")
        assert "Call 0800 123 456" in r.display()
        assert len(r.events("help.requested")) == 1
        assert r.app.db.get_meta("help_limit")["refused"] == 1
    assert [e.type for e in stored_events(kit)].count("help.requested") == 1


def test_reply_envelopes_name_their_type(kit: BankKit) -> None:
    env = json.loads(kit.help_reply("x"))
    assert env["payloadType"] == "application/vnd.lockerd.help-reply+json"
    assert json.loads(base64.b64decode(env["payload"]))["type"] == "help_reply"


async def test_a_reply_past_reply_valid_s_is_refused_as_too_late(
        make_kit: Callable[..., BankKit], broker: Broker) -> None:
    # The timeout screen comes reply_timeout_s after the request: past reply_valid_s.
    kit = _kit(make_kit, broker, reply_timeout_s=0.2, reply_valid_s=0.05)
    async with running(kit) as r:
        await connected(r)
        data = await ask_help(r)
        await wait_until(lambda: "No reply yet" in r.display(), what="timeout screen")
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        rejected = await r.wait_event("help.reply_rejected")
        assert (rejected.data["reason"], rejected.data["help_id"]) == ("too_late",
                                                                      data["help_id"])
        assert r.events("help.answered") == []


async def test_a_reply_before_any_keyring_is_refused_and_never_shown(
        make_kit: Callable[..., BankKit], broker: Broker) -> None:
    overrides: dict[str, Any] = mqtt_overrides(broker)
    overrides["help"] = {"support_text": "Call 0800 123 456", "reply_timeout_s": 60}
    kit = make_kit([], parcels=["3"], import_files=False, overrides=overrides)
    async with running(kit) as r:
        await connected(r)
        assert r.app.cache.keyring is None
        data = await ask_help(r)
        await wait_until(lambda: "Checking..." in r.display(), what="checking screen")
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        rejected = await r.wait_event("help.reply_rejected")
        assert rejected.data["reason"] == "no_keyring"
        assert rejected.data["help_id"] == data["help_id"]
        assert "Checking..." in r.display()
        assert r.events("help.answered") == []
        # Nothing lost: once the keyring is here, the same request takes a good reply.
        await publish(kit, broker, kit.keyring(version=1), "keyring.json")
        await wait_until(lambda: r.app.cache.keyring_version == 1, what="keyring applied")
        await raw_publish(broker, REPLY_TOPIC, kit.help_reply(data["help_id"]))
        await r.wait_event("help.answered")
        await wait_until(lambda: "New code sent by SMS" in r.display(), what="reply shown")
