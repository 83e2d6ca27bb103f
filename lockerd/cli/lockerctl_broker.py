"""lockerctl's broker side: publish keyrings and bundles, read and acknowledge events."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiomqtt

from lockerd.cli.lockerctl_common import InputError, Subparsers
from lockerd.errors import LockerdError, TrustError
from lockerd.mqtt import BrokerSettings, Topics, read_password
from lockerd.trust.bundle import is_locker_id
from lockerd.trust.dsse import (
    CODES_MANIFEST_PAYLOAD_TYPE,
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    HELP_REPLY_PAYLOAD_TYPE,
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
    if env.payload_type == HELP_REPLY_PAYLOAD_TYPE:
        return topics.help_reply, False, "help reply"
    if env.payload_type == CODES_MANIFEST_PAYLOAD_TYPE:
        raise TrustError("a codes manifest goes with its parts: publish its directory with "
                         "lockerctl publish-parts", reason="payload_type")
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
    """The highest seq S such that every event from 1 (or the state file's mark) to S was printed.

    Events after a gap are held back, unprinted, until the gap is filled; a seq at or below S
    is a re-publish and is not printed again. Only S may be acknowledged (PROTOCOL section 5).
    The seqs an `outbox.shed` event names (`data.seqs`, runs [first, last]) were dropped by
    the bank for good: they count as seen, so a shed gap does not stop acknowledgements.
    """

    def __init__(self, upto: int = 0, *, max_held: int = 10_000) -> None:
        self.upto = upto
        self._held: dict[int, dict[str, Any]] = {}
        self._gone: list[tuple[int, int]] = []
        self._max_held = max_held

    @property
    def gap(self) -> bool:
        """Events past a missing seq are waiting."""
        return bool(self._held)

    def offer(self, event: dict[str, Any], seq: int) -> list[dict[str, Any]]:
        """The events that can be printed now, in seq order (none while a gap is open)."""
        if seq <= self.upto:
            return []
        if event.get("type") == "outbox.shed":
            self._gone.extend(_runs_of(event.get("data")))
        if seq == self.upto + 1 or len(self._held) < self._max_held:
            self._held.setdefault(seq, event)  # past max_held they come again on a resend
        ready: list[dict[str, Any]] = []
        while True:
            following = self._held.pop(self.upto + 1, None)
            if following is not None:
                ready.append(following)
                self.upto += 1
                continue
            run = next((r for r in self._gone if r[0] <= self.upto + 1 <= r[1]), None)
            if run is None:
                break
            self.upto = run[1]
        for stale in [s for s in self._held if s <= self.upto]:
            del self._held[stale]
        return ready


def _runs_of(data: Any) -> list[tuple[int, int]]:
    """The [first, last] runs of an outbox.shed event's data.seqs; anything malformed is none."""
    seqs = data.get("seqs") if isinstance(data, dict) else None
    runs: list[tuple[int, int]] = []
    for run in seqs if isinstance(seqs, list) else []:
        if (isinstance(run, list) and len(run) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in run)
                and 0 < run[0] <= run[1]):
            runs.append((run[0], run[1]))
    return runs


class AckState:
    """The state file of `lockerctl events --state`: one bank's acknowledged seq, kept durably."""

    def __init__(self, path: Path, locker_id: str) -> None:
        self.path = path
        self.locker_id = locker_id

    def load(self) -> int:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise BrokerError(f"--state {self.path}: cannot read it: {exc.strerror}") from exc
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        upto = body.get("upto_seq") if isinstance(body, dict) else None
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            raise BrokerError(f"--state {self.path}: not a lockerctl events state file "
                              "(expected {\"locker_id\": ..., \"upto_seq\": N})")
        if body.get("locker_id") != self.locker_id:
            raise BrokerError(f"--state {self.path} belongs to locker "
                              f"{body.get('locker_id')!r}, not {self.locker_id!r}: use one "
                              "state file per bank")
        return upto

    def save(self, upto: int) -> None:
        """Written and synced before the acknowledgement that relies on it is sent."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump({"locker_id": self.locker_id, "upto_seq": upto}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


RESEND_AGAIN_S = 5.0  # a gap still open this long after asking is asked about again


def cmd_events(args: argparse.Namespace) -> int:
    settings, topics = _settings(args)
    state = AckState(args.state, args.locker) if args.state is not None else None
    if args.ack and state is None:
        print("lockerctl: --ack without --state acknowledges nothing: the bank keeps every "
              "event until a backend that stores them acknowledges", file=sys.stderr)
    tracker = AckTracker(state.load()) if state is not None else None
    printed, acked = _run(_follow_events(args, settings, topics, tracker, state), settings)
    if args.ack and state is not None:
        print(f"lockerctl: {printed} event(s) printed; acknowledged up to seq {acked}",
              file=sys.stderr)
    return 0


async def _follow_events(args: argparse.Namespace, settings: BrokerSettings, topics: Topics,
                         tracker: AckTracker | None,
                         state: AckState | None) -> tuple[int, int]:
    """Print events until --count, --wait or the end; (events printed, seq acknowledged)."""
    # A fixed client id keeps a persistent session, so events published while this
    # tool was not running are delivered when it comes back.
    persistent = bool(args.client_id)
    async with settings.client(clean_session=not persistent,
                               timeout_s=args.timeout) as client:
        await client.subscribe(topics.events, qos=1)
        printer = _EventPrinter(client, topics, args, tracker, state, sys.stdout)
        if tracker is not None:
            upto = tracker.upto
            await printer.resend("start" if upto == 0 else f"start after seq {upto}")
        try:
            async with asyncio.timeout(args.wait if args.wait > 0 else None):
                async for message in _messages(client, RESEND_AGAIN_S):
                    await printer.resend_if_still_open()
                    if message is None:
                        continue
                    await printer.take(message)
                    if args.count and printer.printed >= args.count:
                        break
        except TimeoutError:
            pass
    return printer.printed, printer.acked


class _EventPrinter:
    """One `lockerctl events` run: puts events in seq order, prints, saves and acknowledges."""

    def __init__(self, client: aiomqtt.Client, topics: Topics, args: argparse.Namespace,
                 tracker: AckTracker | None, state: AckState | None, out: TextIO) -> None:
        self._client = client
        self._topics = topics
        self._ack = bool(args.ack)
        self._tracker = tracker
        self._state = state
        self._out = out
        self._asked = 0.0  # when the open gap was last asked about
        self.printed = 0
        self.acked = tracker.upto if tracker is not None else 0

    async def resend(self, why: str) -> None:
        assert self._tracker is not None
        from_seq = self._tracker.upto + 1
        print(f"lockerctl: {why}: asking {self._topics.events_resend} from seq "
              f"{from_seq}", file=sys.stderr)
        self._asked = time.monotonic()
        await self._client.publish(self._topics.events_resend,
                                   json.dumps({"from_seq": from_seq}), qos=1)

    async def resend_if_still_open(self) -> None:
        """Ask again about a gap still open RESEND_AGAIN_S after the last request."""
        if self._tracker is not None and self._tracker.gap and \
                time.monotonic() - self._asked >= RESEND_AGAIN_S:
            await self.resend("gap still open")

    async def take(self, message: aiomqtt.Message) -> None:
        event = _decode_event(message)
        if event is None:
            return
        ready = await self._in_order(event, message)
        for item in ready:
            print(json.dumps(item, separators=(",", ":")), file=self._out, flush=True)
            if (words := describe_help_event(item)) is not None:
                # Beside the JSON line, not in it: stdout stays parseable.
                print(f"lockerctl: {words}", file=sys.stderr, flush=True)
            self.printed += 1
        if ready:
            await self._save_and_ack()

    async def _in_order(self, event: dict[str, Any],
                        message: aiomqtt.Message) -> list[dict[str, Any]]:
        """The events `event` makes printable: itself without --state, else those in seq order."""
        tracker = self._tracker
        if tracker is None:
            return [event]
        seq = event.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            print(f"lockerctl: ignored a message without a seq on "
                  f"{message.topic}", file=sys.stderr)
            return []
        before, was_gap = tracker.upto, tracker.gap
        ready = tracker.offer(event, seq)
        if tracker.gap and not was_gap and not ready:
            await self.resend(f"gap: seq {seq} came after {before}")
        return ready

    async def _save_and_ack(self) -> None:
        # The state file is synced before the acknowledgement that relies on it is sent.
        if self._tracker is None or self._state is None:
            return
        self._state.save(self._tracker.upto)
        if self._ack:
            await self._client.publish(
                self._topics.events_ack,
                json.dumps({"upto_seq": self._tracker.upto}), qos=1)
            self.acked = self._tracker.upto


def describe_help_event(event: Mapping[str, Any]) -> str | None:
    """A help event in words, for `lockerctl events`; None for any other event."""
    data = event.get("data")
    if not isinstance(data, dict):
        return None
    match event.get("type"):
        case "help.requested":
            return (f"help requested H-{data.get('reference')} at {event.get('at')}: tracking "
                    f"{data.get('tracking')}, phone ending {data.get('phone_last4')} "
                    f"(help_id {data.get('help_id')})")
        case "help.answered":
            return f"help answered ({data.get('outcome')}): help_id {data.get('help_id')}"
        case "help.reply_rejected":
            return f"help reply refused ({data.get('reason')}): {data.get('detail', '')}"
    return None


async def _messages(client: aiomqtt.Client,
                    idle_s: float) -> AsyncIterator[aiomqtt.Message | None]:
    """The client's messages, with a None after every `idle_s` without one."""
    stream = aiter(client.messages)
    while True:
        try:
            async with asyncio.timeout(idle_s):
                message = await anext(stream)
        except TimeoutError:
            yield None
            continue
        yield message


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
        "lockers/<id>/cmd, a help reply (never retained) to lockers/<id>/help/reply. QoS 1.")
    add_broker_arguments(p)
    p.add_argument("file", help="the signed envelope (from lockerctl keyring / bundle)")
    p.add_argument("--no-retain", action="store_true",
                   help="do not retain, even a keyring or snapshot")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "events", help="print a locker's events from the broker, and acknowledge them",
        description="Subscribe to lockers/<id>/events and print each event as one JSON line. "
        "With --state FILE, events are printed in seq order without duplicates, the highest "
        "seq up to which all were printed is kept in FILE (one per bank), and the bank is "
        "asked on lockers/<id>/events/resend for what is missing: at start and on a gap. "
        "With --ack as well, {\"upto_seq\": N} is published on lockers/<id>/events/ack for "
        "that seq, never past a gap, so the locker can prune them. With --client-id, a "
        "persistent session keeps events that arrive while lockerctl is not running. "
        "Help requests, answers and refused replies are also described in words on stderr.")
    add_broker_arguments(p)
    p.add_argument("--ack", action="store_true",
                   help="acknowledge what was printed (needs --state)")
    p.add_argument("--state", type=Path, default=None, metavar="FILE",
                   help="file keeping the highest contiguous seq printed, for this bank")
    p.add_argument("--count", type=int, default=0, help="stop after N events (default: never)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="stop after this many seconds (default: never)")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("state", help="print a locker's retained state",
                       description="Print the retained lockers/<id>/state document: online or "
                       "offline, code and keyring versions, compartments.")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_state)
