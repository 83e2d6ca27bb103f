"""Draining a backlog of events through the outbox, and the latency of one event commit, each
beside bare baselines measured in the same run. Prints figures; asserts nothing.

The daemon runs in this process (build_app(...).run(), as the test suite runs it) on a bank
provisioned with make_bank, and as its own `lockerd run` process started while the broker is
down (the broker brought up after it), against a mosquitto of the benchmark's own on a free
loopback port. The backend's subscriber runs in a child process, the same code for every
variant."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import math
import multiprocessing
import os
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import aiomqtt
from benchbroker import Broker
from benchlib import (
    Summary,
    cpu_seconds,
    exit_on_sigterm,
    filesystem_of,
    machine_line,
    report,
    start_daemon,
    stop_process,
    work_directory,
)

from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.core.actions import Record
from lockerd.dev.provision import BankKit, make_bank
from lockerd.mqtt import BrokerSettings, Topics
from lockerd.timeutil import format_time, utcnow

LOCKER_ID = "L1"
TOPICS = Topics.for_locker(LOCKER_ID)
FILL_BATCH = 1000
"""Backlog events per Controller.commit (one transaction each) while filling, untimed."""

BROKER_CONFIG = "max_queued_messages 0"
"""Mosquitto drops QoS 1 messages queued for a client beyond 1000 by default; no limit here, so
a subscriber that falls behind loses nothing."""

TARGET = 0.5
"""The outbox drains at least half as fast as the bare pipelined publisher."""
QUICK_RECONNECT = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
"""The `lockerd run` process's reconnect backoff: it is started while the broker is down, and
the wait for its next attempt once the broker is up is not timed, only made short."""
MODES = {"in-process": ("outbox",), "process": ("process",), "both": ("outbox", "process")}

COMMIT_WARMUP = 20
STARTED = time.monotonic()
LOAD_AT_START = os.getloadavg()
POLL_S = 0.005
RETRY_S = 0.01
"""How often the subscriber of a process run tries to connect while the broker is down."""

EVENTS_DDL = """
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    at           TEXT NOT NULL,
    compartment  TEXT,
    code_id      TEXT,
    data         TEXT NOT NULL,
    class        TEXT NOT NULL DEFAULT 'access',
    published_at TEXT
)
"""
"""The `events` table of lockerd/store/db.py, for the bare insert baseline."""

COMMIT_RECORD = Record(
    "lock.pulse",
    compartment="3",
    code_id="p-17",
    data={"attempt": 1, "kind": "pickup", "source": "keypad"},
)
"""The event committed one at a time: what the daemon commits before it pulses a lock."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="1. Outbox drain: commit a backlog of N events to a provisioned bank "
        "before the daemon runs, then run the daemon in-process against a mosquitto of the "
        "benchmark's own and time from the MQTT link coming up until a backend subscriber "
        "(aiomqtt, QoS 1, in a child process, acking every --ack-every events) holds all N "
        "distinct seqs. Same-run baselines: a bare aiomqtt client publishing the same N bodies "
        "at QoS 1 to the same broker, awaiting each PUBACK in turn (sequential) and with the "
        "outbox's in-flight window (pipelined), counted by the same subscriber. "
        "2. Commit latency: Controller.commit of one event (one transaction, WAL, "
        "synchronous=FULL) beside a bare SQLite insert of the same row with the same pragmas "
        "into a fresh file. Prints figures; asserts nothing."
    )
    parser.add_argument(
        "--events",
        type=int,
        default=100_000,
        metavar="N",
        help="events in the backlog, and messages of each bare baseline (100000)",
    )
    parser.add_argument(
        "--sequential",
        type=int,
        default=None,
        metavar="N",
        help="messages of the sequential bare baseline (default: --events)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="N",
        help="rounds of (bare pipelined, outbox) drains, each on a fresh backlog, the order "
        "swapped every other round; medians are printed (3)",
    )
    parser.add_argument(
        "--ack-every",
        type=int,
        default=500,
        metavar="N",
        help="the subscriber acks (events/ack, upto_seq) every N messages and at the end (500)",
    )
    parser.add_argument(
        "--commits",
        type=int,
        default=2000,
        metavar="N",
        help="timed single-event commits, and as many bare inserts, interleaved (2000)",
    )
    parser.add_argument(
        "--daemon",
        choices=sorted(MODES),
        default="both",
        help="how the outbox runs: in this process (build_app(...).run()), as a `lockerd run` "
        "process started while the broker is down, or both in every round (both)",
    )
    parser.add_argument(
        "--skip-drain", action="store_true", help="measure only the commit latency"
    )
    parser.add_argument(
        "--skip-commit", action="store_true", help="measure only the outbox drain"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="PATH",
        help="run the outbox drain under cProfile and write its stats to PATH (read them with "
        "`python -m pstats PATH`); the drain's figures are then the profiled ones",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="work under PATH and keep it (banks, databases, logs); default: a temporary "
        "directory, removed at exit. Choose the disk whose fsync to measure",
    )
    args = parser.parse_args(argv)
    if args.sequential is None:
        args.sequential = args.events
    if args.events < 1 or args.sequential < 0 or args.ack_every < 1 or args.commits < 1 \
            or args.rounds < 1:
        parser.error("--events, --rounds, --ack-every and --commits must be at least 1, "
                     "--sequential at least 0")
    return args


# -- the backend's subscriber (child process) -------------------------------------------------


@dataclass(frozen=True)
class Received:
    """What the subscriber saw of one run. Times are time.monotonic() (CLOCK_MONOTONIC, the
    same clock in every process of the machine)."""

    all_at: float
    """When the last missing seq of 1..N arrived (nan if they did not all arrive)."""
    distinct: int
    received: int
    duplicates: int
    extra: int
    """Messages with a seq outside 1..N (the daemon's own daemon.started, for instance)."""
    cpu_s: float
    """The subscriber process's CPU time from subscribed to done."""


def subscriber_main(host: str, port: int, n: int, ack_every: int, timeout_s: float,
                    conn: Connection, identifier: str | None) -> None:
    """Child process: subscribe to the events topic at QoS 1, say "ready", count seqs 1..N and
    ack (`{"upto_seq": contiguous}`) every `ack_every` messages and once all have come. With
    an `identifier`, it resumes that persistent session (what the broker queued for it): it
    says "trying" and tries to connect every RETRY_S until the broker is up."""
    try:
        asyncio.run(_subscribe(host, port, n, ack_every, timeout_s, conn, identifier))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", repr(exc)))
        raise
    finally:
        conn.close()


async def _subscribe(host: str, port: int, n: int, ack_every: int, timeout_s: float,
                     conn: Connection, identifier: str | None) -> None:
    seen = bytearray(n + 1)
    distinct = received = duplicates = extra = contiguous = 0
    all_at = math.nan
    acks: set[asyncio.Task[None]] = set()
    async with contextlib.AsyncExitStack() as stack:
        client = await _connect(stack, host, port, identifier, timeout_s, conn)

        def ack() -> None:
            nonlocal contiguous
            while contiguous < n and seen[contiguous + 1]:
                contiguous += 1
            body = json.dumps({"upto_seq": contiguous})
            task = asyncio.create_task(client.publish(TOPICS.events_ack, body, qos=1))
            acks.add(task)
            task.add_done_callback(acks.discard)

        await client.subscribe(TOPICS.events, qos=1)
        conn.send(("ready",))
        cpu0 = time.process_time()
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray | str):
                        continue
                    seq = json.loads(payload)["seq"]
                    received += 1
                    if isinstance(seq, int) and 1 <= seq <= n:
                        if seen[seq]:
                            duplicates += 1
                        else:
                            seen[seq] = 1
                            distinct += 1
                    else:
                        extra += 1
                    if distinct == n:
                        all_at = time.monotonic()
                        ack()
                        break
                    if received % ack_every == 0:
                        ack()
        except TimeoutError:
            pass
        cpu_s = time.process_time() - cpu0
        # The last acks must reach the broker before the goodbye.
        await asyncio.gather(*acks, return_exceptions=True)
    conn.send(("done", Received(all_at, distinct, received, duplicates, extra, cpu_s)))


async def _connect(stack: contextlib.AsyncExitStack, host: str, port: int,
                   identifier: str | None, timeout_s: float, conn: Connection) -> aiomqtt.Client:
    """A connected client, entered into `stack`. A persistent session (`identifier`) is tried
    every RETRY_S until the broker answers, after saying "trying"."""
    if identifier is None:
        client = aiomqtt.Client(host, port, identifier=f"bench-backend-{os.getpid()}",
                                clean_session=True)
        return await stack.enter_async_context(client)
    conn.send(("trying",))
    deadline = time.monotonic() + timeout_s
    while True:
        client = aiomqtt.Client(host, port, identifier=identifier, clean_session=False)
        try:
            return await stack.enter_async_context(client)
        except aiomqtt.MqttError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(RETRY_S)


class Subscriber:
    """The child process, started and subscribed on entry, gone on exit. With an
    `identifier` it may be launched first, before the broker is up (`launch`)."""

    def __init__(self, broker: Broker, n: int, ack_every: int, timeout_s: float,
                 identifier: str | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=subscriber_main,
            args=(broker.host, broker.port, n, ack_every, timeout_s, child, identifier),
            daemon=True,
        )
        self._child = child
        self._n = n
        self._timeout_s = timeout_s
        self._launched = False

    async def launch(self) -> None:
        """Start the child and wait until it is trying to connect (its imports done)."""
        self._proc.start()
        self._child.close()
        self._launched = True
        reply = await self._recv(30.0)
        if reply[0] != "trying":
            raise RuntimeError(f"the subscriber did not start: {reply}")

    async def __aenter__(self) -> Subscriber:
        if not self._launched:
            self._proc.start()
            self._child.close()
        reply = await self._recv(30.0)
        if reply[0] != "ready":
            raise RuntimeError(f"the subscriber did not start: {reply}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # After a normal run the child has sent its figures and is saying goodbye; after a
        # failure or an interruption it is stopped at once.
        if exc_type is None:
            await _readable(self._proc.sentinel, 10.0)
        if self._proc.is_alive():
            self._proc.terminate()
            await _readable(self._proc.sentinel, 5.0)
        self._proc.join(0)
        self._conn.close()

    async def result(self) -> Received:
        reply = await self._recv(self._timeout_s + 30.0)
        if reply[0] != "done":
            raise RuntimeError(f"the subscriber failed: {reply}")
        got: Received = reply[1]
        if math.isnan(got.all_at):
            raise RuntimeError(f"the subscriber got {got.distinct} of the seqs 1..{self._n} "
                               f"in {self._timeout_s:.0f} s")
        return got

    async def _recv(self, timeout_s: float) -> tuple[Any, ...]:
        # Waited for in the event loop, not in a thread: a thread blocked in poll() would hold
        # up asyncio.run's shutdown after a Ctrl-C or SIGTERM.
        if not await _readable(self._conn.fileno(), timeout_s):
            raise RuntimeError(f"no word from the subscriber in {timeout_s:.0f} s")
        try:
            reply: tuple[Any, ...] = self._conn.recv()
        except EOFError:
            raise RuntimeError("the subscriber process ended without a word") from None
        return reply


async def _readable(fd: int, timeout_s: float) -> bool:
    """Wait until `fd` is readable (a pipe with data, a process sentinel of an ended child)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


# -- drain runs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drain:
    label: str
    n: int
    seconds: float
    """Start (link up, or bare client connected) -> the subscriber holds all N seqs."""
    publisher_s: float
    """Start -> N PUBACKs received by the publishing side."""
    publisher_cpu_s: float
    """CPU time of this process from the start to the N-th PUBACK."""
    subscriber: Received
    broker_cpu_s: float
    subscriber_back_s: float = math.nan
    """Process runs: from the start to the subscriber having resumed its session (it comes
    back after the broker, a spawned process; what was published before, the broker queued)."""

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else math.nan


def drain_timeout(n: int) -> float:
    return 60.0 + n / 200.0


async def bare_run(broker: Broker, bodies: Sequence[str], *, window: int, pipelined: bool,
                   ack_every: int) -> Drain:
    """A bare aiomqtt client, built with the daemon's own options (the same client factory,
    persistent session, in-flight limit), publishing `bodies` at QoS 1."""
    n = len(bodies)
    settings = BrokerSettings(host=broker.host, port=broker.port,
                              client_id=f"bench-bare-{'pipe' if pipelined else 'seq'}")
    async with (
        Subscriber(broker, n, ack_every, drain_timeout(n)) as sub,
        settings.client(clean_session=False, max_inflight=window) as client,
    ):
        cpu_broker0 = _broker_cpu(broker)
        t0, cpu0 = time.monotonic(), time.process_time()
        if pipelined:
            await _publish_pipelined(client, bodies, window)
        else:
            for body in bodies:
                await client.publish(TOPICS.events, body, qos=1)
        t1, cpu1 = time.monotonic(), time.process_time()
        got = await sub.result()
        cpu_broker1 = _broker_cpu(broker)
    label = (f"bare aiomqtt, pipelined ({window} in flight)" if pipelined
             else "bare aiomqtt, sequential awaits")
    return Drain(label, n, got.all_at - t0, t1 - t0, cpu1 - cpu0, got,
                 cpu_broker1 - cpu_broker0)


async def _publish_pipelined(client: aiomqtt.Client, bodies: Sequence[str], window: int) -> None:
    """What OutboxPublisher._drain does, without the database and the JSON encoding: one task
    per message, a semaphore of the in-flight window, tasks created in order."""
    slots = asyncio.Semaphore(window)
    inflight: set[asyncio.Task[None]] = set()

    async def one(body: str) -> None:
        try:
            await client.publish(TOPICS.events, body, qos=1)
        finally:
            slots.release()

    for body in bodies:
        await slots.acquire()
        task = asyncio.create_task(one(body))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    await asyncio.gather(*inflight)


async def outbox_run(app: App, broker: Broker, n: int, ack_every: int,
                     profiler: cProfile.Profile | None) -> tuple[Drain, float]:
    """Run the daemon in this event loop; the backlog seqs 1..N are already committed.
    Returns the drain and the seconds from the link up to acked_upto >= N in the database."""
    link, publisher = app.link, app.publisher
    assert link is not None and publisher is not None
    marks: dict[str, float] = {}

    async def link_up() -> None:
        # Registered before the daemon's own tasks exist: woken first when the link comes up.
        await link.connected.wait()
        marks["up"], marks["cpu_up"] = time.monotonic(), time.process_time()

    async def pubacks() -> None:
        marks["pubacks"] = await poll_until(lambda: publisher.confirmed >= n)
        marks["cpu_pubacks"] = time.process_time()

    async def acked() -> None:
        marks["acked"] = await poll_until(lambda: app.outbox.acked_upto() >= n)

    async with Subscriber(broker, n, ack_every, drain_timeout(n)) as sub:
        watch_up = asyncio.create_task(link_up())
        cpu_broker0 = _broker_cpu(broker)
        if profiler is not None:
            profiler.enable()
        daemon = asyncio.create_task(app.run(install_signal_handlers=False))
        try:
            await asyncio.wait_for(app.ready.wait(), 30)
            await asyncio.wait_for(watch_up, 30)
            watch_pubacks = asyncio.create_task(pubacks())
            got = await sub.result()
            cpu_broker1 = _broker_cpu(broker)
            await asyncio.wait_for(watch_pubacks, 60)
            await asyncio.wait_for(acked(), 60)
        finally:
            if profiler is not None:
                profiler.disable()
            app.request_stop()
            await asyncio.wait_for(daemon, 30)
    t0 = marks["up"]
    drain = Drain("lockerd outbox (MqttLink + OutboxPublisher)", n, got.all_at - t0,
                  marks["pubacks"] - t0, marks["cpu_pubacks"] - marks["cpu_up"], got,
                  cpu_broker1 - cpu_broker0)
    return drain, marks["acked"] - t0


async def process_run(kit: BankKit, broker: Broker, n: int, ack_every: int) -> Drain:
    """`lockerd run` as its own process, started while the broker is down, with the backlog
    seqs 1..N committed; then the broker comes up. The subscriber's persistent session is
    made first and kept across the broker's restart, so nothing published before it is back
    is lost. Timed from the daemon's `connected to the broker` log line (its wall clock,
    taken to CLOCK_MONOTONIC) until the subscriber holds all N."""
    identifier = f"bench-backend-{kit.directory.name}"
    await prime_session(broker, identifier)
    await asyncio.to_thread(broker.stop)
    sub = Subscriber(broker, n, ack_every, drain_timeout(n), identifier)
    daemon = await asyncio.to_thread(start_daemon, kit)
    try:
        # Launched while the broker is down: it tries to connect every RETRY_S, so it is
        # back within moments of the broker, as a backend's consumer would be.
        await sub.launch()
        cpu0 = cpu_seconds(daemon.pid)
        await asyncio.to_thread(broker.start)
        cpu_broker0 = _broker_cpu(broker)
        async with sub:
            back = time.monotonic()
            got = await sub.result()
            cpu1, cpu_broker1 = cpu_seconds(daemon.pid), _broker_cpu(broker)
        t0 = connected_at(daemon.log_path)
    finally:
        status = await asyncio.to_thread(stop_process, daemon.proc)
    if status != 0:
        raise RuntimeError(f"the daemon exited with status {status}:\n{daemon.log_tail()}")
    return Drain("lockerd run process (MqttLink + OutboxPublisher)", n, got.all_at - t0,
                 math.nan, cpu1 - cpu0, got, cpu_broker1 - cpu_broker0, back - t0)


async def prime_session(broker: Broker, identifier: str) -> None:
    """A persistent session subscribed to the events topic at QoS 1, left offline: the broker
    queues what is published for it until the subscriber takes the session over."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=identifier,
                              clean_session=False) as client:
        await client.subscribe(TOPICS.events, qos=1)


def connected_at(log_path: Path) -> float:
    """When the daemon logged its first `connected to the broker`, as time.monotonic()."""
    offset = time.time() - time.monotonic()
    with log_path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if "connected to the broker" not in line:
                continue
            entry = json.loads(line)
            if entry.get("event") == "connected to the broker":
                return datetime.fromisoformat(entry["timestamp"]).timestamp() - offset
    raise RuntimeError(f"no `connected to the broker` in {log_path}")


async def poll_until(cond: Callable[[], bool]) -> float:
    """Check `cond` every POLL_S (the daemon keeps counters, not events, for these); returns
    time.monotonic() when it first holds. The resolution is POLL_S."""
    while True:
        if cond():
            return time.monotonic()
        await asyncio.sleep(POLL_S)


def _broker_cpu(broker: Broker) -> float:
    return cpu_seconds(broker.pid) if broker.pid is not None else math.nan


# -- backlog ----------------------------------------------------------------------------------


def pickup_records(i: int) -> list[Record]:
    """The five events of a pickup at the keypad, as the daemon records them."""
    cid, code_id = str(i % 16 + 1), f"p-{i}"
    return [
        Record("lock.pulse", compartment=cid, code_id=code_id,
               data={"attempt": 1, "kind": "pickup", "source": "keypad"}),
        Record("door.opened", compartment=cid, code_id=code_id, data={"kind": "pickup"}),
        Record("pickup.opened", compartment=cid, code_id=code_id,
               data={"attempt": 1, "source": "keypad"}),
        Record("door.closed", compartment=cid, code_id=code_id),
        Record("pickup.completed", compartment=cid, code_id=code_id,
               data={"occupancy_known": True}),
    ]


async def fill_backlog(app: App, n: int) -> float:
    """Commit N events (pickups' events in turn) with the daemon's Controller.commit,
    FILL_BATCH per transaction; returns the seconds it took."""
    records: list[Record] = []
    pickup = 0
    while len(records) < n:
        records.extend(pickup_records(pickup))
        pickup += 1
    t0 = time.perf_counter()
    for start in range(0, n, FILL_BATCH):
        await app.controller.commit(*records[start : min(n, start + FILL_BATCH)])
    return time.perf_counter() - t0


def wire_bodies(app: App, n: int) -> list[str]:
    """The exact bodies the outbox will publish for seqs 1..N (same code as _publish_one)."""
    out: list[str] = []
    after = 0
    while len(out) < n:
        batch = app.outbox.pending(after, 5000)
        if not batch:
            break
        for event in batch[: n - len(out)]:
            out.append(json.dumps(event.wire(LOCKER_ID), separators=(",", ":")))
        after = batch[-1].seq
    if len(out) != n or app.events.last_seq() != n:
        raise RuntimeError(f"backlog has {len(out)} events, last seq {app.events.last_seq()}")
    return out


def provision_bank(directory: Path, broker: Broker | None, n: int, *,
                   quick_reconnect: bool = False) -> BankKit:
    overrides: dict[str, Any] = {
        "logging": {"level": "info", "format": "json"},
        # Over the backlog: nothing is shed.
        "outbox": {"max_events": max(200_000, 2 * n)},
    }
    if broker is not None:
        # A client id of its own: no bank takes over a session of an earlier round's bank, and
        # with it the acks the broker queued for that one.
        overrides["mqtt"] = {"host": broker.host, "port": broker.port,
                             "client_id": f"lockerd-{directory.name}",
                             **(QUICK_RECONNECT if quick_reconnect else {})}
    # No keyring or bundle files to import: importing would commit events of its own, and the
    # backlog is to be seqs 1..N exactly. Codes are not needed here.
    return make_bank(directory, locker_id=LOCKER_ID, compartments=16, overrides=overrides,
                     import_files=False)


@dataclass
class DrainResults:
    sequential: Drain | None = None
    pipelined: list[Drain] = field(default_factory=list)
    outbox: list[Drain] = field(default_factory=list)
    """One of each per round, in round order (outbox and process as --daemon asks)."""
    process: list[Drain] = field(default_factory=list)
    acked_s: list[float] = field(default_factory=list)
    fill_s: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    window: int = 0


async def measure_drain(args: argparse.Namespace, work: Path, broker: Broker) -> DrainResults:
    """Rounds of (bare pipelined, outbox in-process, `lockerd run` process), the order rotated
    every round so that a drift of the machine's speed favours none; each daemon run on a
    fresh bank and backlog."""
    n = args.events
    modes = MODES[args.daemon]
    results = DrainResults()
    for r in range(args.rounds):
        apps: dict[str, tuple[BankKit, App]] = {}
        for mode in modes:
            kit = provision_bank(work / f"bank-{r + 1}-{mode}", broker, n,
                                 quick_reconnect=mode == "process")
            apps[mode] = (kit, build_app(load_config(kit.config_path)))
            results.fill_s.append(await fill_backlog(apps[mode][1], n))
        app = apps[modes[0]][1]
        assert app.link is not None
        window = results.window = app.link.max_inflight
        bodies = wire_bodies(app, n)
        if "process" in apps:
            apps["process"][1].db.close()  # the daemon process opens it
        if r == 0:
            results.sizes = [len(b.encode()) for b in bodies]
            if args.sequential:
                gc.collect()
                results.sequential = await bare_run(
                    broker, bodies[: args.sequential], window=window, pipelined=False,
                    ack_every=args.ack_every)
        order = ("bare", *modes)
        for what in order[r % len(order):] + order[: r % len(order)]:
            gc.collect()
            if what == "bare":
                results.pipelined.append(await bare_run(
                    broker, bodies, window=window, pipelined=True, ack_every=args.ack_every))
                continue
            if what == "process":
                results.process.append(
                    await process_run(apps["process"][0], broker, n, args.ack_every))
                continue
            profiler = cProfile.Profile() if args.profile and r == 0 else None
            drain, acked_s = await outbox_run(apps["outbox"][1], broker, n, args.ack_every,
                                              profiler)
            if profiler is not None:
                profiler.dump_stats(args.profile)
            results.outbox.append(drain)
            results.acked_s.append(acked_s)
    return results


# -- commit latency ---------------------------------------------------------------------------


async def measure_commits(work: Path, n: int) -> dict[str, list[float]]:
    """Controller.commit of one event on a provisioned bank's database, interleaved with a bare
    INSERT of the same row into a fresh file with the same pragmas, one transaction each."""
    kit = provision_bank(work / "commit-bank", None, n)
    app = build_app(load_config(kit.config_path))
    bare = sqlite3.connect(work / "bare-commit.db", isolation_level=None)
    try:
        bare.execute("PRAGMA journal_mode=WAL")
        bare.execute("PRAGMA synchronous=FULL")
        bare.execute(EVENTS_DDL)
        at = format_time(utcnow())
        data = json.dumps(dict(COMMIT_RECORD.data))
        rows = [
            (str(uuid.uuid4()), COMMIT_RECORD.type, at, COMMIT_RECORD.compartment,
             COMMIT_RECORD.code_id, data, "access")
            for _ in range(n + COMMIT_WARMUP)
        ]
        sql = ("INSERT INTO events (event_id, type, at, compartment, code_id, data, class)"
               " VALUES (?, ?, ?, ?, ?, ?, ?)")
        lockerd_s: list[float] = []
        bare_s: list[float] = []
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            await app.controller.commit(COMMIT_RECORD)
            t1 = time.perf_counter()
            bare.execute("BEGIN IMMEDIATE")
            bare.execute(sql, row)
            bare.execute("COMMIT")
            t2 = time.perf_counter()
            if i >= COMMIT_WARMUP:
                lockerd_s.append(t1 - t0)
                bare_s.append(t2 - t1)
        return {"lockerd": lockerd_s, "bare": bare_s}
    finally:
        bare.close()
        app.db.close()


# -- output -----------------------------------------------------------------------------------


def drain_row(label: str, run: Drain, pipe_rate: float) -> str:
    us = 1e6 / run.n
    return (f"  {label:<44}{run.n:>7}{run.seconds:>8.2f}{run.rate:>9.0f}"
            f"{run.rate / pipe_rate:>8.2f}{run.publisher_s:>9.2f}{run.publisher_cpu_s * us:>8.1f}"
            f"{run.subscriber.cpu_s * us:>8.1f}{run.broker_cpu_s * us:>8.1f}")


def report_drain(args: argparse.Namespace, res: DrainResults, out: TextIO) -> None:
    sizes = res.sizes
    print(file=out)
    print(f"1. drain of a backlog of {args.events} events to a subscriber (QoS 1, in a child "
          f"process, acking every {args.ack_every}); {args.rounds} round(s)", file=out)
    print(f"  bodies {statistics.mean(sizes):.0f} bytes on average ({min(sizes)}-{max(sizes)}), "
          f"topic {TOPICS.events}; in-flight window {res.window} (MqttLink.max_inflight); "
          f"mosquitto `{BROKER_CONFIG}`", file=out)
    print(f"  backlog committed untimed in {statistics.median(res.fill_s):.1f} s (median; "
          f"Controller.commit, {FILL_BATCH} events per transaction)", file=out)
    if args.profile:
        print(f"  PROFILED (cProfile, stats in {args.profile}): the round-1 outbox figures "
              f"include the profiler's overhead", file=out)
    print(f"  {'':<44}{'n':>7}{'s':>8}{'ev/s':>9}{'/pipe':>8}{'PUBACKs':>9}{'pub CPU':>8}"
          f"{'sub CPU':>8}{'mqd CPU':>8}", file=out)
    print(f"  {'':<44}{'':>7}{'':>8}{'':>9}{'':>8}{'s':>9}{'µs/ev':>8}{'µs/ev':>8}{'µs/ev':>8}",
          file=out)
    pipe_median = statistics.median(r.rate for r in res.pipelined)
    if res.sequential is not None:
        print(drain_row("baseline: bare aiomqtt, sequential awaits", res.sequential,
                        pipe_median), file=out)
    kinds = [(label, runs) for label, runs in (("lockerd outbox, in-process", res.outbox),
                                               ("lockerd run, a process", res.process)) if runs]
    for r, pipe in enumerate(res.pipelined):
        print(drain_row(f"round {r + 1} baseline: bare aiomqtt, pipelined", pipe, pipe.rate),
              file=out)
        for label, runs in kinds:
            print(drain_row(f"round {r + 1} {label}", runs[r], pipe.rate), file=out)
    ratios = {label: [d.rate / p.rate for p, d in zip(res.pipelined, runs, strict=True)]
              for label, runs in kinds}
    print(f"  medians: bare pipelined {pipe_median:.0f} events/s; " + "; ".join(
        f"{label} {statistics.median(d.rate for d in runs):.0f} events/s, / pipelined per "
        f"round {', '.join(f'{x:.2f}' for x in ratios[label])}" for label, runs in kinds),
        file=out)
    if res.sequential is not None:
        print(f"  bare sequential {res.sequential.rate:.0f} events/s = "
              f"{res.sequential.rate / pipe_median:.2f} of the pipelined median", file=out)
    for label, runs in kinds:
        dups = sum(d.subscriber.duplicates for d in runs)
        extra = sum(d.subscriber.extra for d in runs)
        print(f"  {label}: {dups} duplicates, {extra} messages outside 1..N received before "
              "the last", file=out)
    if res.process:
        print(f"  process: the subscriber had resumed its session "
              f"{', '.join(f'{d.subscriber_back_s:.2f}' for d in res.process)} s after the "
              "daemon connected (negative: before)", file=out)
    if res.acked_s:
        print(f"  in-process: acked_upto >= N in the database "
              f"{', '.join(f'{a:.2f}' for a in res.acked_s)} s after the link came up", file=out)
    for (label, runs), name in zip(kinds, ("in-process", "process") if res.outbox
                                   else ("process",), strict=True):
        ratio = statistics.median(ratios[label])
        rate = statistics.median(d.rate for d in runs)
        report(f"outbox_drain {name} {args.events}".replace(",", " "),
               f"{label} {rate:.0f} events/s against a bare pipelined aiomqtt publisher "
               f"{pipe_median:.0f} events/s (median of {len(runs)} rounds' ratios)",
               ratio, TARGET, lower_is_better=False)


def commit_row(label: str, values: list[float]) -> str:
    s = Summary.of(values)
    ms = [v * 1000 for v in (s.median, s.p99, s.min, s.max)]
    return f"  {label:<46}{s.n:>7}{ms[0]:>9.3f}{ms[1]:>9.3f}{ms[2]:>9.3f}{ms[3]:>9.3f}"


def report_all(args: argparse.Namespace, work: Path, drain: DrainResults | None,
           commits: dict[str, list[float]] | None, out: TextIO = sys.stdout) -> None:
    print(f"outbox_drain: {machine_line()}", file=out)
    took = time.monotonic() - STARTED
    print(f"  ended {time.strftime('%Y-%m-%d %H:%M:%S %Z')} after {took:.0f} s; work in {work} "
          f"({filesystem_of(work)})", file=out)
    print(f"  load average {LOAD_AT_START[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
          f"end (the run itself keeps about 2 busy; more means other jobs shared the CPUs)",
          file=out)
    if drain is not None:
        report_drain(args, drain, out)
    if commits is not None:
        print(file=out)
        print(f"2. commit of one event (one transaction, WAL, synchronous=FULL), "
              f"{args.commits} of each, interleaved", file=out)
        print(f"  {'':<46}{'n':>7}{'median':>9}{'p99':>9}{'min':>9}{'max':>9}   (ms)", file=out)
        print(commit_row("baseline: bare sqlite3 INSERT, fresh file", commits["bare"]), file=out)
        print(commit_row("Controller.commit(Record(...))", commits["lockerd"]), file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    broker: Broker | None = None
    status = 0
    try:
        # The daemon's log goes to the work directory's log file.
        with work_directory(args.dir) as work:
            try:
                drain = None
                if not args.skip_drain:
                    (work / "broker").mkdir()
                    # Persistent: the process rounds restart it with a subscriber's session.
                    broker = Broker(work / "broker", extra_config=BROKER_CONFIG, persistent=True)
                    broker.start()
                    drain = asyncio.run(measure_drain(args, work, broker))
                commits = None if args.skip_commit else asyncio.run(
                    measure_commits(work, args.commits))
                report_all(args, work, drain, commits)
            finally:
                # Stopped before its directory goes.
                if broker is not None:
                    broker.stop()
    except RuntimeError as exc:
        print(f"outbox_drain: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("outbox_drain: interrupted", file=sys.stderr)
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
