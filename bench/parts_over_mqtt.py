"""A snapshot in parts over a local broker to `lockerd run`: time to applied and peak RSS."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import aiomqtt
from benchbroker import Broker
from benchlib import (
    children_of,
    machine_line,
    proc_status,
    rss_kib,
    run_in_work_directory,
    start_daemon,
    stop_process,
    unique_codes,
)
from benchlib import report as print_result
from loop_lag import TARGET_MS as STALL_TARGET_MS
from loop_lag import ChildMemory, Probe, Row, idle_stall, serving

from lockerd.app import build_app
from lockerd.cli.lockerctl_parts import load_parts_set
from lockerd.config import load_config
from lockerd.dev.provision import make_bank, to_toml
from lockerd.mqtt import Topics
from lockerd.services.parts import PARTS_CACHE_KIB
from lockerd.store.staging import entry_row
from lockerd.trust.parts import DEFAULT_PART_BYTES, decode_part

TARGET_RSS = 2.0
"""Peak RSS of the daemon while it receives and applies the set, to its RSS idle."""
TARGET_TIME = 3.0
"""First publish of the manifest to the swap committed, to a bare insert of the same rows."""
LOCKERCTL = [sys.executable, "-m", "lockerd.cli.lockerctl_cmd"]
SAMPLE_S = 0.02

_TABLE = """CREATE TABLE codes (digest TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL, compartment TEXT, parcel_id TEXT, not_before INTEGER,
    not_after INTEGER NOT NULL, max_uses INTEGER NOT NULL) WITHOUT ROWID"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=(
        "Same-run baseline: a bare SQLite executemany of the same rows into a fresh file "
        "(WAL, synchronous=FULL, the page cache the daemon stages parts with, one "
        "transaction). Prints figures; asserts nothing."))
    parser.add_argument("--codes", type=int, default=20_000,
                        help="codes in the snapshot (default 20000; the issue's figure is "
                        "for 1000000)")
    parser.add_argument("--part-bytes", type=int, default=DEFAULT_PART_BYTES,
                        help=f"largest part (default {DEFAULT_PART_BYTES})")
    parser.add_argument("--dir", type=Path, default=None,
                        help="an empty directory to work in (default: a temporary one)")
    return parser.parse_args(argv)


class PeakSampler:
    """VmRSS of a process and of its children (the apply process) sampled every SAMPLE_S
    in a thread; the highest of each, and of their sum, seen."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_kib = 0
        self.child_peak_kib = 0
        self.sum_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            own = rss_kib(self._pid)
            children = sum(map(_rss_or_gone, children_of(self._pid)))
            self.peak_kib = max(self.peak_kib, own)
            self.child_peak_kib = max(self.child_peak_kib, children)
            self.sum_peak_kib = max(self.sum_peak_kib, own + children)


def _rss_or_gone(pid: int) -> int:
    try:
        return rss_kib(pid)
    except (OSError, KeyError):
        return 0  # it ended meanwhile


def held_version(db_path: Path) -> int:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'codes_version'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(SAMPLE_S)


def write_codes(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("id,code,kind,compartment,parcel_id\n")
        for n, code in enumerate(unique_codes(count)):
            f.write(f"p-{n},{code},pickup,{n % 16 + 1},PX{n}\n")


async def publish(broker: Broker, locker_id: str, directory: Path) -> None:
    """What `lockerctl publish-parts` does, in this process so its start is not timed."""
    parts = load_parts_set(directory, locker_id=locker_id)
    topics = Topics.for_locker(locker_id)
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(topics.codes_manifest, parts.raw_manifest, qos=1, retain=True)
        for index in range(parts.manifest.part_count):
            await client.publish(topics.codes_part, parts.part(index), qos=1)


def in_process_config(config_path: Path) -> Path:
    """The bank's config with a state directory of its own, beside it (same keys)."""
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    config["locker"]["state_dir"] = "state-in-process"
    config["backends"]["sim"].pop("socket", None)
    path = config_path.with_name("lockerd-in-process.toml")
    path.write_text(to_toml(config), encoding="utf-8")
    return path


async def loop_stall(config_path: Path, broker: Broker, locker_id: str,
                     parts: Path) -> Row:
    """The daemon in this process with loop_lag's probe: (longest stall while the parts are
    published and applied, the seconds that took, longest stall idle as long, the apply
    process's peak RSS)."""
    app = build_app(load_config(config_path))
    probe = Probe()

    async def body() -> Row:
        assert app.link is not None and app.parts is not None
        parts_service = app.parts
        await asyncio.wait_for(app.link.subscribed.wait(), 30)
        probe.start()
        await asyncio.sleep(0.5)
        with ChildMemory(lambda: parts_service.process_pid) as child:
            start = time.perf_counter()
            # The publisher in its own process: its work is not the daemon's loop's.
            proc = await asyncio.create_subprocess_exec(
                *LOCKERCTL, "publish-parts", "--broker", f"{broker.host}:{broker.port}",
                "--locker", locker_id, str(parts), stdout=subprocess.DEVNULL)
            while app.codes.version() != 2:
                if time.perf_counter() - start > 600:
                    raise RuntimeError("the parts were not applied in 10 minutes")
                await asyncio.sleep(0.01)
            end = time.perf_counter()
        await proc.wait()
        idle = await idle_stall(probe, end - start)
        await probe.stop()
        return (probe.longest(start, end), end - start, idle, child.peak_kib,
                probe.cpu_of_longest(start, end), probe.longest_busy(start, end),
                probe.others_of_longest(start, end))

    result: Row = await serving(app, body)
    return result


def bare_insert(parts: Path, db_path: Path) -> float:
    """Seconds for the same rows in one executemany (the parts decoded beforehand)."""
    rows = [entry_row(e) for p in sorted(parts.glob("part-*.bin"))
            for e in decode_part(p.read_bytes())]
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{PARTS_CACHE_KIB}")
        conn.execute(_TABLE)
        conn.execute("CREATE INDEX by_parcel ON codes (parcel_id) WHERE parcel_id IS NOT NULL")
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def run(work: Path, args: argparse.Namespace) -> None:
    (work / "broker-dir").mkdir()
    broker = Broker(work / "broker-dir")
    broker.start()
    try:
        kit = make_bank(work / "bank", compartments=16, overrides={
            "logging": {"level": "info", "format": "json"},
            "mqtt": {"host": broker.host, "port": broker.port}})
        write_codes(work / "codes.csv", args.codes)
        keys = kit.directory / "keys"
        parts = work / "set"
        t0 = time.perf_counter()
        subprocess.run([*LOCKERCTL, "parts", "--locker", kit.locker_id, "--version", "2",
                        "--code-key", str(keys / "code_key"), "--codes", str(work / "codes.csv"),
                        "--not-after-in", "7d", "--expires-in", "2d", "--sign",
                        str(keys / "codes.key"), "--part-bytes", str(args.part_bytes),
                        "-o", str(parts)], check=True, stdout=subprocess.DEVNULL)
        signed_s = time.perf_counter() - t0
        count = len(list(parts.glob("part-*.bin")))
        size = sum(p.stat().st_size for p in parts.glob("part-*.bin"))
        daemon = start_daemon(kit)
        try:
            db_path = kit.state_dir / "lockerd.db"
            time.sleep(1.0)  # connected and settled
            idle = rss_kib(daemon.pid)
            with PeakSampler(daemon.pid) as sampler:
                t0 = time.perf_counter()
                asyncio.run(publish(broker, kit.locker_id, parts))
                wait_for(lambda: held_version(db_path) == 2, 600, "the snapshot applied")
                applied_s = time.perf_counter() - t0
            hwm = int(proc_status(daemon.pid)["VmHWM"].split()[0])
        finally:
            stop_process(daemon.proc)
        bare_s = bare_insert(parts, work / "bare.db")
        stall = asyncio.run(loop_stall(in_process_config(kit.config_path), broker,
                                       kit.locker_id, parts))
    finally:
        broker.stop()
    peak = max(sampler.peak_kib, idle)
    board = max(sampler.sum_peak_kib, idle)
    print(machine_line())
    print(f"snapshot: {args.codes} codes in {count} part(s) of at most {args.part_bytes} bytes"
          f" ({size / 2**20:.1f} MiB); lockerctl parts took {signed_s:.2f} s")
    print(f"time to applied (manifest published to swap committed): {applied_s:.2f} s")
    print(f"bare insert of the same rows (WAL, synchronous=FULL, {PARTS_CACHE_KIB} KiB page "
          f"cache, one transaction): {bare_s:.2f} s")
    print(f"  ratio {applied_s / bare_s:.2f}x {verdict(applied_s / bare_s, TARGET_TIME)}")
    print(f"daemon RSS idle {idle / 1024:.1f} MiB, peak while applying {peak / 1024:.1f} MiB "
          f"(sampled every {SAMPLE_S * 1000:.0f} ms; VmHWM since start {hwm / 1024:.1f} MiB)")
    print(f"  the daemon alone: ratio {peak / idle:.2f}x")
    print(f"apply process peak RSS {sampler.child_peak_kib / 1024:.1f} MiB; daemon and apply "
          f"process together at most {board / 1024:.1f} MiB")
    print(f"  ratio {board / idle:.2f}x {verdict(board / idle, TARGET_RSS)}")
    during, seconds, idle_stall_s, child_kib, cpu_in_longest, busiest, others = stall
    print(f"in-process daemon, a fresh database: longest event-loop stall while the parts "
          f"were applied ({seconds:.2f} s) {during * 1e3:.2f} ms, idle as long "
          f"{idle_stall_s * 1e3:.2f} ms (apply process peak RSS {child_kib / 1024:.1f} MiB)")
    print(f"  the loop thread's CPU in that stall {cpu_in_longest * 1e3:.2f} ms, the daemon's "
          f"other threads' {others * 1e3:.2f} ms; most loop CPU in "
          f"one tick {busiest * 1e3:.2f} ms (the rest of a stall is waiting for a core or "
          "the GIL)")
    print(f"  {during * 1e3:.2f} ms (target < {STALL_TARGET_MS:g} ms: "
          f"{'holds' if during * 1e3 < STALL_TARGET_MS else 'does not hold'})")
    print_result(f"parts_over_mqtt time {args.codes}",
                 f"{applied_s:.2f} s to applied against a bare insert of {bare_s:.2f} s",
                 applied_s / bare_s, TARGET_TIME)
    print_result(f"parts_over_mqtt peak RSS {args.codes}",
                 f"daemon and apply process at most {board / 1024:.1f} MiB against the daemon "
                 f"idle {idle / 1024:.1f} MiB (the daemon alone {peak / 1024:.1f} MiB)",
                 board / idle, TARGET_RSS)
    print_result(f"parts_over_mqtt loop stall {args.codes}",
                 f"longest stall while the parts are applied in {seconds:.2f} s (idle "
                 f"{idle_stall_s * 1e3:.1f} ms, loop thread CPU in one tick at most "
                 f"{busiest * 1e3:.1f} ms)", during * 1e3, STALL_TARGET_MS, unit=" ms")


def verdict(ratio: float, target: float) -> str:
    return f"(target < {target:g}x: {'holds' if ratio < target else 'does not hold'})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_work_directory("parts_over_mqtt", args.dir, lambda work: run(work, args))


if __name__ == "__main__":
    sys.exit(main())
