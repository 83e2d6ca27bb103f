"""lockerctl's broker side: publish keyrings and bundles, read and acknowledge events."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiomqtt

from lockerd.cli.lockerctl_common import InputError, Subparsers
from lockerd.errors import LockerdError, TrustError
from lockerd.mqtt import BrokerSettings, Topics, read_password
from lockerd.trust.bundle import is_locker_id
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    parse_envelope,
)

T = TypeVar("T")


class BrokerError(LockerdError):
    """The broker could not be reached or refused us."""


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="localhost:1883", metavar="HOST[:PORT]",
                   help="the MQTT broker (default localhost:1883)")
    p.add_argument("--locker", required=True, help="the locker_id whose topics to use")
    p.add_argument("--prefix", default="", help="topic prefix (default lockers/<locker>/)")
    p.add_argument("--username", default=None)
    p.add_argument("--password-file", default=None, type=Path,
                   help="file holding the broker password (never on the command line)")
    p.add_argument("--ca-file", default=None, help="CA certificate: connect with TLS")
    p.add_argument("--cert-file", default=None, help="client certificate (with --key-file)")
    p.add_argument("--key-file", default=None, help="client certificate's key")
    p.add_argument("--client-id", default="", help="MQTT client id (default: random)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the broker (default 10)")


def _settings(args: argparse.Namespace) -> tuple[BrokerSettings, Topics]:
    if not is_locker_id(args.locker):
        raise InputError(f"--locker {args.locker!r} is not a valid locker_id")
    host, _, port_text = str(args.broker).rpartition(":")
    if not host:
        host, port_text = port_text, "1883"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InputError(f"--broker {args.broker!r}: the port must be a number 1-65535")
    if (args.cert_file is None) != (args.key_file is None):
        raise InputError("--cert-file and --key-file go together")
    password = None
    if args.password_file is not None:
        password = read_password(args.password_file, where="--password-file")
    settings = BrokerSettings(
        host=host, port=int(port_text), client_id=args.client_id, username=args.username,
        password=password, ca_file=args.ca_file, cert_file=args.cert_file,
        key_file=args.key_file,
    )
    return settings, Topics.for_locker(args.locker, args.prefix)


def _topic_for(raw: bytes, topics: Topics) -> tuple[str, bool, str]:
    """Where a signed envelope goes, whether it is retained, and what it is."""
    env = parse_envelope(raw)
    if env.payload_type == KEYRING_PAYLOAD_TYPE:
        return topics.keyring, True, "keyring"
    if env.payload_type == CODES_PAYLOAD_TYPE:
        try:
            base = json.loads(env.payload).get("base_version")
        except (ValueError, AttributeError) as exc:
            raise TrustError("codes payload is not a JSON object", reason="malformed") from exc
        # A snapshot is retained so a bank that connects later gets it; a delta is not.
        return topics.codes, base is None, "codes snapshot" if base is None else "codes delta"
    if env.payload_type == COMMAND_PAYLOAD_TYPE:
        return topics.cmd, False, "command"
    raise TrustError(f"payloadType {env.payload_type!r} is not published by lockerctl",
                     reason="payload_type")


def cmd_publish(args: argparse.Namespace) -> int:
    settings, topics = _settings(args)
    raw = Path(args.file).read_bytes()
    topic, retain, what = _topic_for(raw, topics)
    if args.no_retain:
        retain = False

    async def go() -> None:
        async with settings.client(clean_session=True, timeout_s=args.timeout) as client:
            await client.publish(topic, raw, qos=1, retain=retain)

    _run(go(), settings)
    print(f"published {what} ({len(raw)} bytes) to {topic}"
          f"{' (retained)' if retain else ''}")
    return 0


class AckTracker:
    """Acknowledges the highest seq up to which every event has been seen, in order."""

    def __init__(self) -> None:
        self.upto: int | None = None

    def seen(self, seq: int) -> bool:
        """True when `seq` moves the acknowledgement forward."""
        if self.upto is None or seq == self.upto + 1:
            self.upto = seq
            return True
        return False


def cmd_events(args: argparse.Namespace) -> int:
    settings, topics = _settings(args)
    out: TextIO = sys.stdout

    async def go() -> int:
        tracker = AckTracker()
        count = 0
        # A fixed client id keeps a persistent session, so events published while this
        # tool was not running are delivered when it comes back.
        persistent = bool(args.client_id)
        async with settings.client(clean_session=not persistent,
                                   timeout_s=args.timeout) as client:
            await client.subscribe(topics.events, qos=1)
            try:
                async with asyncio.timeout(args.wait if args.wait > 0 else None):
                    async for message in client.messages:
                        event = _decode_event(message)
                        if event is None:
                            continue
                        print(json.dumps(event, separators=(",", ":")), file=out, flush=True)
                        count += 1
                        seq = event.get("seq")
                        if args.ack and isinstance(seq, int) and tracker.seen(seq):
                            await client.publish(topics.events_ack,
                                                 json.dumps({"upto_seq": seq}), qos=1)
                        if args.count and count >= args.count:
                            break
            except TimeoutError:
                pass
        return count

    got = _run(go(), settings)
    if args.ack and got:
        print(f"lockerctl: {got} event(s) printed and acknowledged", file=sys.stderr)
    return 0


def _decode_event(message: aiomqtt.Message) -> dict[str, Any] | None:
    payload = message.payload
    try:
        event = json.loads(payload if isinstance(payload, bytes | str) else b"")
    except ValueError:
        print(f"lockerctl: ignored a non-JSON message on {message.topic}", file=sys.stderr)
        return None
    return event if isinstance(event, dict) else None


def cmd_state(args: argparse.Namespace) -> int:
    settings, topics = _settings(args)

    async def go() -> Any:
        async with settings.client(clean_session=True, timeout_s=args.timeout) as client:
            await client.subscribe(topics.state, qos=1)
            async with asyncio.timeout(args.timeout):
                async for message in client.messages:
                    payload = message.payload
                    return json.loads(payload if isinstance(payload, bytes | str) else b"{}")
        return None

    try:
        state = _run(go(), settings)
    except TimeoutError:
        print(f"lockerctl: no retained state on {topics.state}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2))
    return 0


def _run(coro: Coroutine[Any, Any, T], settings: BrokerSettings) -> T:
    try:
        return asyncio.run(coro)
    except aiomqtt.MqttError as exc:
        raise BrokerError(f"broker {settings.host}:{settings.port}: {exc}") from exc


def add_parsers(sub: Subparsers) -> None:
    """Register publish, events and state."""
    p = sub.add_parser(
        "publish", help="publish a signed keyring, codes bundle or command to a locker's topic",
        description="Publish a signed envelope file to the topic its payloadType belongs to: "
        "a keyring (retained) to lockers/<id>/keyring, a codes snapshot (retained) or delta "
        "(not retained) to lockers/<id>/codes, a command (never retained) to "
        "lockers/<id>/cmd. QoS 1.")
    add_broker_arguments(p)
    p.add_argument("file", help="the signed envelope (from lockerctl keyring / bundle)")
    p.add_argument("--no-retain", action="store_true",
                   help="do not retain, even a keyring or snapshot")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "events", help="print a locker's events from the broker, and acknowledge them",
        description="Subscribe to lockers/<id>/events and print each event as one JSON line. "
        "With --ack, publish {\"upto_seq\": N} on lockers/<id>/events/ack as events arrive in "
        "order, so the locker can prune them. With --client-id, a persistent session keeps "
        "events that arrive while lockerctl is not running.")
    add_broker_arguments(p)
    p.add_argument("--ack", action="store_true", help="acknowledge what was printed")
    p.add_argument("--count", type=int, default=0, help="stop after N events (default: never)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="stop after this many seconds (default: never)")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("state", help="print a locker's retained state",
                       description="Print the retained lockers/<id>/state document: online or "
                       "offline, code and keyring versions, compartments.")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_state)
