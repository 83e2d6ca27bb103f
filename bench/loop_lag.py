"""The longest event-loop stall of an in-process daemon during a big apply, beside it idle."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchbroker import Broker
from benchlib import hwm_kib, machine_line, rss_kib, run_in_work_directory, unique_codes
from benchlib import report as print_result

from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.dev.provision import PlainCode, make_bank

TARGET_MS = 20.0
"""The target: no stall of the loop over 20 ms during any apply."""
TICK_S = 0.001


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the daemon in this process on a simulated bank with a probe task "
        "that sleeps 1 ms and records how late it wakes (the loop's stall). Reports the "
        "longest stall while a snapshot of N codes arrives over MQTT (its own mosquitto; "
        "published by a small paho process) and is applied, and from "
        "`App.run` to READY with a `[codes] bundle_file` of N codes on a fresh database; "
        "beside each, the same probe over the same time with the daemon idle. Prints "
        "figures; asserts nothing.")
    parser.add_argument("--codes", type=int, default=50_000, metavar="N",
                        help="codes in the snapshot (50000; over about 58000 the JSON is "
                        "above 16 MiB, so max_payload_bytes is raised to fit)")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="work under PATH and keep it (default: a temporary directory)")
    parser.add_argument("--receive-mib", type=lambda t: [float(x) for x in t.split(",") if x],
                        default=[], metavar="M,...",
                        help="also time a bare aiomqtt receive of one message of each of these "
                        "sizes in MiB (e.g. 1,2,4,8,16): paho reads a packet on the loop")
    args = parser.parse_args(argv)
    if args.codes < 1:
        parser.error("--codes must be at least 1")
    return args


class Probe:
    """Sleeps TICK_S in a loop; each wake-up's lateness is a stall of the loop. Beside it,
    the CPU time the loop's thread spent over the same tick (`time.thread_time`): a stall
    with little CPU is the thread waiting (for a core, on a machine others share, or for the
    GIL that another thread holds), not the loop running something long."""

    def __init__(self) -> None:
        # (woke at, late by, the loop thread's CPU, the other threads' CPU) over each tick
        self.samples: list[tuple[float, float, float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag-probe")

    async def _run(self) -> None:
        while True:
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            await asyncio.sleep(TICK_S)
            t1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
            self.samples.append((t1, t1 - t0 - TICK_S, c1 - c0, (p1 - p0) - (c1 - c0)))

    def longest(self, start: float, end: float) -> float:
        return max((late for at, late, *_ in self.samples if start <= at <= end), default=0.0)

    def longest_busy(self, start: float, end: float) -> float:
        """The most CPU the loop's thread used in one tick: its longest stall of its own."""
        return max((cpu for at, _, cpu, _ in self.samples if start <= at <= end), default=0.0)

    def cpu_of_longest(self, start: float, end: float) -> float:
        """The loop thread's CPU time during the longest stall."""
        return self._of_longest(start, end)[0]

    def others_of_longest(self, start: float, end: float) -> float:
        """The CPU time of this process's other threads during the longest stall: near the
        stall itself, the loop waited for the GIL; near nothing, for a core."""
        return self._of_longest(start, end)[1]

    def _of_longest(self, start: float, end: float) -> tuple[float, float]:
        inside = [(late, cpu, others) for at, late, cpu, others in self.samples
                  if start <= at <= end]
        _, cpu, others = max(inside, default=(0.0, 0.0, 0.0))
        return cpu, others

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class ChildMemory:
    """The peak RSS (VmHWM) of the apply processes a daemon starts, sampled in a thread every
    10 ms; `pid_of` names the one running now, if any."""

    def __init__(self, pid_of: Callable[[], int | None]) -> None:
        self._pid_of = pid_of
        self.peak_kib = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            pid = self._pid_of()
            if pid is not None:
                self.pids.add(pid)
                self.peak_kib = max(self.peak_kib, hwm_kib(pid))


Row = tuple[float, float, float, int, float, float, float]
"""(longest stall, seconds, longest stall idle as long, apply process peak RSS KiB, the loop
thread's CPU time in the longest stall, the most CPU it used in one tick, the other threads'
CPU time in the longest stall)."""


def plain(n: int) -> list[PlainCode]:
    return [PlainCode(f"c-{i}", code, str(1 + i % 8), parcel_id=f"PX{i}")
            for i, code in enumerate(unique_codes(n))]


async def serving(app: App, body: Callable[[], Awaitable[Any]]) -> Any:
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 120)
        return await body()
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 60)


async def idle_stall(probe: Probe, seconds: float) -> float:
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    return probe.longest(start, time.perf_counter())


async def mqtt_apply(work: Path, broker: Broker, n: int) -> Row:
    """(longest stall during the apply, apply seconds, longest stall idle as long, the
    apply process's peak RSS)."""
    kit = make_bank(work / "mqtt-bank", compartments=8, codes=plain(10), overrides={
        "logging": {"level": "info", "format": "json"},
        "mqtt": {"host": broker.host, "port": broker.port,
                 "max_payload_bytes": max(16 << 20, 400 * n)}})
    snapshot = work / "snapshot.json"
    snapshot.write_bytes(kit.bundle(plain(n), version=2))
    app = build_app(load_config(kit.config_path))
    probe = Probe()

    async def body() -> Row:
        assert app.link is not None
        await asyncio.wait_for(app.link.subscribed.wait(), 30)
        probe.start()
        await asyncio.sleep(0.5)
        with ChildMemory(lambda: app.cache.apply_process_pid) as child:
            start = time.perf_counter()
            publisher = await bare_publish(broker, f"lockers/{kit.locker_id}/codes", snapshot)
            if await publisher.wait() != 0:
                raise RuntimeError("publishing the snapshot failed")
            while app.codes.version() != 2:
                if time.perf_counter() - start > 600:
                    raise RuntimeError("the snapshot was not applied in 10 minutes")
                await asyncio.sleep(0.01)
            end = time.perf_counter()
        idle = await idle_stall(probe, end - start)
        await probe.stop()
        return (probe.longest(start, end), end - start, idle, child.peak_kib,
                probe.cpu_of_longest(start, end), probe.longest_busy(start, end),
                probe.others_of_longest(start, end))

    result: Row = await serving(app, body)
    return result


async def bare_publish(broker: Broker, topic: str,
                       payload: Path) -> asyncio.subprocess.Process:
    """The same small publisher process for both rows: paho's `single`, QoS 1."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys, paho.mqtt.publish as p; "
        "p.single(sys.argv[4], open(sys.argv[1], 'rb').read(), qos=1, "
        "hostname=sys.argv[2], port=int(sys.argv[3]))",
        str(payload), broker.host, str(broker.port), topic)


async def bare_receive(broker: Broker, payload: Path) -> Row:
    """The baseline of the MQTT row: a bare aiomqtt client in this loop receiving the same
    payload from the same publisher (paho reads one big packet on the loop)."""
    import aiomqtt

    probe = Probe()
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("bench/bare", qos=1)
        probe.start()
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        publisher = await bare_publish(broker, "bench/bare", payload)
        async for _ in client.messages:
            break
        end = time.perf_counter()
        await publisher.wait()
        idle = await idle_stall(probe, end - start)
        await probe.stop()
    return (probe.longest(start, end), end - start, idle, 0, probe.cpu_of_longest(start, end),
            probe.longest_busy(start, end), probe.others_of_longest(start, end))


async def bundle_file_start(work: Path, n: int) -> Row:
    """(longest stall from App.run to READY, seconds to READY, longest stall idle as long,
    the apply process's peak RSS)."""
    kit = make_bank(work / "file-bank", compartments=8, codes=plain(n),
                    overrides={"logging": {"level": "info", "format": "json"}})
    app = build_app(load_config(kit.config_path))
    # The kit keeps its N plain codes in this process, which a daemon has not: out of the
    # collector's sight, so that a full collection of them is not timed as the daemon's.
    gc.collect()
    gc.freeze()
    probe = Probe()
    probe.start()
    await asyncio.sleep(0.2)
    start = time.perf_counter()
    stamps: dict[str, float] = {}

    async def body() -> float:
        stamps["ready"] = time.perf_counter()
        if app.codes.version() != 1:
            raise RuntimeError("the bundle file was not applied")
        return await idle_stall(probe, stamps["ready"] - start)

    with ChildMemory(lambda: app.cache.apply_process_pid) as child:
        idle: float = await serving(app, body)
    await probe.stop()
    gc.unfreeze()
    ready = stamps["ready"]
    return (probe.longest(start, ready), ready - start, idle, child.peak_kib,
            probe.cpu_of_longest(start, ready), probe.longest_busy(start, ready),
            probe.others_of_longest(start, ready))


def run(args: argparse.Namespace, work: Path) -> None:
    (work / "broker").mkdir()
    broker = Broker(work / "broker")
    broker.start()
    receives: list[tuple[float, Row]] = []
    try:
        mqtt = asyncio.run(mqtt_apply(work, broker, args.codes))
        bare = asyncio.run(bare_receive(broker, work / "snapshot.json"))
        for mib in args.receive_mib:
            blob = work / f"blob-{mib:g}.bin"
            blob.write_bytes(os.urandom(int(mib * 2**20)))
            receives.append((mib, asyncio.run(bare_receive(broker, blob))))
            blob.unlink()
    finally:
        broker.stop()
    start = asyncio.run(bundle_file_start(work, args.codes))
    size = (work / "snapshot.json").stat().st_size
    print(f"loop_lag: longest event-loop stall (a 1 ms sleep woken late), {args.codes} codes "
          f"(a snapshot of {size / 2**20:.1f} MiB)")
    print(f"  {machine_line()}")
    print(f"  daemon (this process) RSS at the end {rss_kib(os.getpid()) / 1024:.1f} MiB")
    print(f"  {'':34} {'seconds':>8} {'longest stall ms':>17} {'idle, as long ms':>17}"
          f" {'apply process peak RSS':>23}")
    for label, (stall, seconds, idle, child_kib, *_) in (
            ("snapshot over MQTT, applied", mqtt),
            ("  bare aiomqtt receive (baseline)", bare),
            ("bundle_file start, run to READY", start)):
        verdict = "holds" if stall * 1e3 < TARGET_MS else "MISSED"
        child = f"{child_kib / 1024:.1f} MiB" if child_kib else "-"
        print(f"  {label:34} {seconds:>8.2f} {stall * 1e3:>17.2f} {idle * 1e3:>17.2f}"
              f" {child:>23}   (target < {TARGET_MS:.0f} ms: {verdict})")
    for label, row in (("snapshot over MQTT", mqtt), ("bare aiomqtt receive", bare),
                       ("bundle_file start", start)):
        print(f"  {label}: the loop thread's CPU in its longest stall {row[4] * 1e3:.2f} ms, "
              f"the other threads' {row[6] * 1e3:.2f} ms; "
              f"most CPU in one tick {row[5] * 1e3:.2f} ms (the rest of a stall is waiting "
              "for a core or the GIL)")
    print(f"  MQTT apply stall / bare receive stall: {mqtt[0] / max(bare[0], 1e-6):.2f}x")
    for mib, (stall, seconds, idle, *_) in receives:
        print(f"  bare aiomqtt receive of one {mib:g} MiB message: longest stall "
              f"{stall * 1e3:.2f} ms in {seconds:.2f} s (idle as long {idle * 1e3:.2f} ms)")
    print_result(f"loop_lag snapshot over MQTT {args.codes}",
                 f"longest stall while {size / 2**20:.1f} MiB is received and applied in "
                 f"{mqtt[1]:.2f} s (bare aiomqtt receive {bare[0] * 1e3:.1f} ms, idle "
                 f"{mqtt[2] * 1e3:.1f} ms, loop thread CPU in one tick at most "
                 f"{mqtt[5] * 1e3:.1f} ms)", mqtt[0] * 1e3, TARGET_MS, unit=" ms")
    print_result(f"loop_lag bundle_file start {args.codes}",
                 f"longest stall from run to READY in {start[1]:.2f} s (idle "
                 f"{start[2] * 1e3:.1f} ms)", start[0] * 1e3, TARGET_MS, unit=" ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_work_directory("loop_lag", args.dir, lambda w: run(args, w))


if __name__ == "__main__":
    sys.exit(main())
