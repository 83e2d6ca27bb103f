"""bundle_apply.py's whole-process and MQTT paths: `lockerd import-bundle` as a process beside a
bare-insert process, and a `lockerd run` process taking a snapshot from a local broker."""

from __future__ import annotations

import asyncio
import json
import logging
import marshal
import os
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiomqtt
from benchbroker import Broker
from benchlib import LOCKERD, proc_status, report, rss_kib, start_daemon, stop_process

from lockerd.dev.provision import BankKit, to_toml
from lockerd.services.banksetup import DB_NAME
from lockerd.store import open_database

Row = tuple[str, str, str, str | None, str | None, int | None, int, int]
"""A row of the `codes` table, in its column order (what CodeStore.apply inserts)."""

PROCESS_TARGET = 2.0
"""Issue 14: a 1M-code `lockerd import-bundle` within 2x of a bare insert."""
MQTT_TARGET = 3.0
"""Issue 14 part 3: a snapshot over the local broker applied within 3x of a bare insert..."""
MQTT_RSS_TARGET = 2.0
"""... with a peak RSS under 2x idle."""
MQTT_MAX_BYTES = 250 * 2**20
"""MQTT's packet limit is 256 MB: a bigger snapshot cannot go as one message."""
MQTT_TIMEOUT_S = 900.0
POLL_S = 0.01

QUIET = logging.getLogger("bundle_apply.mqtt")
QUIET.setLevel(logging.ERROR)

BARE_CHILD = """
import marshal, sqlite3, sys
rows_path, db_path, cache_kib, mode = sys.argv[1:5]
with open(rows_path, "rb") as f:
    rows = marshal.load(f)
conn = sqlite3.connect(db_path, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=FULL")
conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
conn.execute("BEGIN IMMEDIATE")
if mode == "replace":
    for table in ("codes", "code_ids", "code_parcels"):
        conn.execute(f"DELETE FROM {table}")
conn.executemany("INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
conn.executemany("INSERT INTO code_ids VALUES (?, ?)", [(r[1], r[0]) for r in rows])
conn.executemany("INSERT INTO code_parcels VALUES (?, ?)",
                 [(r[4], r[0]) for r in rows if r[4] is not None])
conn.execute("COMMIT")
conn.close()
"""
"""The bare-insert process: Python, the rows read from a marshal file, one transaction into a
database made by open_database, with the store's pragmas and page cache: the codes and their
key tables (code_ids, code_parcels), what the store writes for a snapshot."""


def bare_insert_seconds(rows_path: Path, db_path: Path, cache_kib: int) -> float:
    """BARE_CHILD's insert in this process, timed alone (the rows already read): the
    baseline measured right beside an MQTT apply, in the same page cache and disk state."""
    with rows_path.open("rb") as f:
        rows = marshal.load(f)
    open_database(db_path).close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        os.sync()
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO code_ids VALUES (?, ?)", [(r[1], r[0]) for r in rows])
        conn.executemany("INSERT INTO code_parcels VALUES (?, ?)",
                         [(r[4], r[0]) for r in rows if r[4] is not None])
        conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def inputs_dir(work: Path) -> Path:
    return work / "inputs"


def save_inputs(work: Path, kind: str, size: int, raw: bytes, rows: Sequence[Row]) -> None:
    """The signed file `lockerd import-bundle` reads and the rows the bare process inserts,
    each fsynced before it is closed: left dirty, the kernel would write them back during the
    next timed commit's fsync (the bare insert's, which runs next) and charge it for them."""
    directory = inputs_dir(work)
    directory.mkdir(exist_ok=True)
    with (directory / f"{kind}-{size}.json").open("wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    with (directory / f"{kind}-{size}.rows").open("wb") as f:
        marshal.dump(list(rows), f)
        f.flush()
        os.fsync(f.fileno())


def bank_config(kit: BankKit, directory: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """The kit's configuration with its own state directory (absolute paths throughout);
    `extra` tables are set as given."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tomllib.loads(kit.config_path.read_text(encoding="utf-8"))
    config["locker"]["state_dir"] = str(directory / "state")
    config["trust"]["code_key_file"] = str(kit.directory / config["trust"]["code_key_file"])
    config["logging"] = {"level": "info", "format": "json"}
    for key, value in (extra or {}).items():
        config[key] = value
    path = directory / "lockerd.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    return path


TIME = Path("/usr/bin/time")
"""GNU time: the peak RSS of the process it forks. (os.wait4's ru_maxrss of a child spawned
from this process would report this process's own peak: Linux carries the maximum across the
vfork and exec.)"""


def run_process(cmd: Sequence[str], log: Path) -> tuple[float, int]:
    """Run `cmd` to its end; its wall seconds and its peak RSS in KiB (from GNU time; 0 if
    it is not installed). Raises RuntimeError if it fails."""
    rss_file = log.with_name(log.name + ".rss")
    wrapped = [str(TIME), "-f", "%M", "-o", str(rss_file), *cmd] if TIME.exists() else list(cmd)
    # Each timed process starts with nothing left for the kernel to write back: a run after a
    # 1M insert otherwise fsyncs behind its hundreds of dirty megabytes.
    os.sync()
    with log.open("ab") as out:
        t0 = time.monotonic()
        status = subprocess.run(wrapped, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, check=False).returncode
        wall = time.monotonic() - t0
    if status != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-10:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with status {status}:\n{tail}")
    try:
        peak_kib = int(rss_file.read_text(encoding="ascii").split()[-1])
    except (OSError, ValueError, IndexError):
        peak_kib = 0
    return wall, peak_kib


# -- the whole process ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessResult:
    size: int
    kind: str
    """"empty" (a fresh bank) or "replace" (a snapshot over the held one)."""
    bare_s: float
    bare_kib: int
    lockerd_s: float
    lockerd_kib: int


def measure_process(kit: BankKit, work: Path, sizes: Sequence[int],
                    cache_kib: int, *, run: int = 0) -> list[ProcessResult]:
    """Per size, into an empty bank: the bare-insert process, then `lockerd import-bundle`;
    at the largest, the replacing snapshot the same way into the same two databases. `run`
    numbers the banks' directories (a fresh pair each run)."""
    out: list[ProcessResult] = []
    inputs = inputs_dir(work)
    for size in sizes:
        directory = work / (f"process-{size}" if run == 0 else f"process-{size}-{run}")
        config = bank_config(kit, directory)
        log = directory / "processes.log"
        run_process([*LOCKERD, "import-keyring", "-c", str(config), str(kit.keyring_path)], log)
        bare_db = directory / "bare.db"
        open_database(bare_db).close()
        kinds = ["snapshot", "replace"] if (inputs / f"replace-{size}.json").exists() \
            else ["snapshot"]
        for kind in kinds:
            bare_s, bare_kib = run_process(
                [sys.executable, "-c", BARE_CHILD, str(inputs / f"{kind}-{size}.rows"),
                 str(bare_db), str(cache_kib), kind], log)
            lockerd_s, lockerd_kib = run_process(
                [*LOCKERD, "import-bundle", "-c", str(config), str(inputs / f"{kind}-{size}.json")],
                log)
            out.append(ProcessResult(size, "empty" if kind == "snapshot" else "replace",
                                     bare_s, bare_kib, lockerd_s, lockerd_kib))
    return out


def report_process(results: Sequence[ProcessResult]) -> None:
    print("whole process: `lockerd import-bundle` (verify + apply + event) beside a bare-insert "
          "process (python, rows from a marshal file, one transaction, the store's settings); "
          "wall time from spawn to exit, peak RSS from /usr/bin/time; one run each")
    print(f"  {'':<44}{'wall s':>9}{'peak MiB':>10}{'x bare':>8}")
    for r in results:
        label = f"{r.size:,} codes, {'into an empty bank' if r.kind == 'empty' else 'replacing'}"
        print(f"  {label}")
        print(f"  {'  baseline: bare-insert process':<44}{r.bare_s:>9.3f}"
              f"{r.bare_kib / 1024:>10.0f}{1:>8.2f}")
        print(f"  {'  lockerd import-bundle':<44}{r.lockerd_s:>9.3f}"
              f"{r.lockerd_kib / 1024:>10.0f}{r.lockerd_s / r.bare_s:>8.2f}")
    print()
    for r in results:
        n = f"{r.size:,}".replace(",", " ")
        report(f"bundle_apply import-bundle {n} {r.kind}",
               f"the process {r.lockerd_s:.2f} s against a bare-insert process {r.bare_s:.2f} s "
               f"(peak RSS {r.lockerd_kib / 1024:.0f} MiB against {r.bare_kib / 1024:.0f} MiB)",
               r.lockerd_s / r.bare_s, PROCESS_TARGET)
    print()


# -- over MQTT --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttResult:
    size: int
    envelope_bytes: int
    seconds: float
    """Publish (QoS 1) to `cache.updated` committed in the bank's database."""
    idle_kib: int
    peak_kib: int
    bare_s: float
    """The bare insert of the same rows, in-process, just before (its baseline)."""
    """VmHWM of the daemon once the snapshot is applied."""


def measure_mqtt(kit: BankKit, work: Path, sizes: Sequence[int],
                 cache_kib: int) -> list[MqttResult | int]:
    """Per size whose envelope fits one MQTT message, a fresh bank (keyring imported) run as
    `lockerd run` against a broker of the benchmark's own; the snapshot published once the
    bank is online, right after a bare insert of the same rows (its baseline; `cache_kib` its
    page cache) in the same disk state. A size too big for one message is returned as its
    envelope size."""
    out: list[MqttResult | int] = []
    for size in sizes:
        raw = (inputs_dir(work) / f"snapshot-{size}.json").read_bytes()
        if len(raw) > MQTT_MAX_BYTES:
            out.append(len(raw))
            continue
        directory = work / f"mqtt-{size}"
        directory.mkdir(parents=True, exist_ok=True)
        bare_s = bare_insert_seconds(inputs_dir(work) / f"snapshot-{size}.rows",
                                     directory / "bare.db", cache_kib)
        # A broker of its own for each size: the banks share a client id, and a session the
        # broker kept from the size before could hand this bank that size's snapshot again.
        (directory / "broker").mkdir(exist_ok=True)
        broker = Broker(directory / "broker")
        broker.start()
        try:
            out.append(_mqtt_one(kit, directory, broker, size, raw, bare_s))
        finally:
            broker.stop()
    return out


def _mqtt_one(kit: BankKit, directory: Path, broker: Broker, size: int, raw: bytes,
              bare_s: float) -> MqttResult:
    mqtt = {"host": broker.host, "port": broker.port,
            "max_payload_bytes": max(16 * 2**20, len(raw) + 2**20)}
    config = bank_config(kit, directory, {"mqtt": mqtt})
    doc = tomllib.loads(config.read_text(encoding="utf-8"))
    doc["backends"]["sim"]["socket"] = str(directory / "sim.sock")
    config.write_text(to_toml(doc), encoding="utf-8")
    run_process([*LOCKERD, "import-keyring", "-c", str(config), str(kit.keyring_path)],
                directory / "processes.log")
    bank = replace(kit, directory=directory, config_path=config,
                   socket_path=directory / "sim.sock", state_dir=directory / "state")
    daemon = start_daemon(bank)
    try:
        prefix = f"lockers/{kit.locker_id}/"
        seconds, idle_kib = asyncio.run(_publish_and_wait(
            broker, prefix, raw, size, directory / "state" / DB_NAME, daemon.pid))
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited:\n{daemon.log_tail()}")
        peak_kib = int(proc_status(daemon.pid)["VmHWM"].split()[0])
    finally:
        stop_process(daemon.proc)
    return MqttResult(size, len(raw), seconds, idle_kib, peak_kib, bare_s)


async def _publish_and_wait(broker: Broker, prefix: str, raw: bytes, size: int, db_path: Path,
                            pid: int) -> tuple[float, int]:
    """Wait for the bank online, publish the snapshot of `size` codes, poll its database for
    the outcome; returns (seconds from publish to cache.updated, RSS just before publishing).
    RuntimeError if it was refused, or if what was applied is not a snapshot of `size`."""
    async with aiomqtt.Client(broker.host, broker.port, logger=QUIET) as client:
        await client.subscribe(prefix + "state", qos=1)
        async with asyncio.timeout(30):
            async for message in client.messages:
                if json.loads(message.payload).get("status") == "online":
                    break
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            after = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            idle_kib = rss_kib(pid)
            t0 = time.monotonic()
            await client.publish(prefix + "codes", raw, qos=1)
            async with asyncio.timeout(MQTT_TIMEOUT_S):
                while True:
                    row = db.execute("SELECT type, data FROM events WHERE seq > ? AND type IN "
                                     "('cache.updated', 'cache.rejected')", (after,)).fetchone()
                    if row is not None:
                        break
                    await asyncio.sleep(POLL_S)
            seconds = time.monotonic() - t0
        finally:
            db.close()
    if row[0] != "cache.updated":
        raise RuntimeError(f"the bank refused the snapshot: {row[1]}")
    if json.loads(row[1]).get("upserted") != size:
        raise RuntimeError(f"the bank applied another snapshot than the one timed: {row[1]}")
    return seconds, idle_kib


def report_mqtt(results: Sequence[MqttResult | int]) -> None:
    print("over MQTT: a `lockerd run` process on the simulator, its broker on loopback; the "
          "snapshot published at QoS 1 once the bank is online, timed until `cache.updated` is "
          f"in its database (polled every {POLL_S * 1000:.0f} ms); the baseline is a bare "
          "insert of the same rows in this process just before it (os.sync() before each)")
    measured = [r for r in results if isinstance(r, MqttResult)]
    for r in results:
        if not isinstance(r, MqttResult):
            print(f"  a snapshot of {r / 2**20:.0f} MiB is over MQTT's 256 MB packet limit: "
                  "not sent as one message (bench/parts_over_mqtt.py sends one in parts)")
    for r in measured:
        bare = r.bare_s
        print(f"  {r.size:,} codes, {r.envelope_bytes / 2**20:.1f} MiB: {r.seconds:.3f} s to "
              f"cache.updated ({r.seconds / bare:.2f}x the bare insert, {bare:.3f} s); RSS "
              f"{r.idle_kib / 1024:.1f} MiB idle, peak {r.peak_kib / 1024:.1f} MiB")
    print()
    for r in measured:
        n = f"{r.size:,}".replace(",", " ")
        bare = r.bare_s
        report(f"bundle_apply mqtt {n}",
               f"published to cache.updated {r.seconds:.2f} s against a bare insert {bare:.2f} s",
               r.seconds / bare, MQTT_TARGET)
        report(f"bundle_apply mqtt {n} peak RSS",
               f"{r.peak_kib / 1024:.1f} MiB against {r.idle_kib / 1024:.1f} MiB idle",
               r.peak_kib / r.idle_kib, MQTT_RSS_TARGET)
    print()
