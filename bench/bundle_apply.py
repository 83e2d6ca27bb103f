"""Verifying and applying big codes bundles, and looking a code up among a million, beside bare
SQLite and HMAC baselines measured in the same run. Prints figures; asserts nothing.

In this process, on the daemon's own functions (verify_bundle, CodeStore, CodeCache): a snapshot
into an empty database, a snapshot replacing a held one, deltas, lookups. The bare insert runs
with the store's settings: a database made by open_database (the same schema and indexes, WAL,
synchronous=FULL) and the page cache CodeStore.apply sets. Then the whole-process path
(`lockerd import-bundle` as a process beside a bare-insert process) and the MQTT path (a
`lockerd run` process taking the snapshot from a local broker), in bundlepaths.py."""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import os
import random
import resource
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import bundlepaths
from benchlib import Summary, filesystem_of, machine_line, report, run_in_work_directory

import lockerd.store.codes
from lockerd.dev.provision import BankKit, make_bank
from lockerd.services.cache import CodeCache
from lockerd.store import CodeStore, Database, EventLog, open_database
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodeEntry, build_bundle_payload, verify_bundle
from lockerd.trust.digest import code_digest
from lockerd.trust.dsse import CODES_PAYLOAD_TYPE, RoleKeys, sign_envelope
from lockerd.trust.keyring import Keyring, accept_keyring

T = TypeVar("T")

COMPARTMENTS = 16
DELTA_CODES = 100
CODE_SPACE = 10**8
"""8-digit codes, as the other benchmarks use."""

APPLY_TARGET = 3.0
"""docs/benchmarks.md: CodeStore.apply and the whole load_bundle within 3x of a bare insert."""
LOOKUP_TARGET = 2.0
"""The lookup of an entered code within 2x of a bare HMAC + SELECT by digest."""

APPLY_CACHE_KIB: int = getattr(lockerd.store.codes, "APPLY_CACHE_KIB", 65536)
"""The page cache CodeStore.apply works with (KiB); the bare inserts get the same."""

Row = bundlepaths.Row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build signed snapshots of N pickup codes (untimed), then time, in-process: "
        "verify_bundle alone, CodeStore.apply alone on an empty database, and the whole "
        "CodeCache.load_bundle on another; at the largest size a snapshot of N replacing a "
        "held N (half the codes the same), 100-code deltas, and the lookup of one entered code "
        "(code_digest + CodeStore.lookup). Then `lockerd import-bundle` as a process, and a "
        "`lockerd run` process taking the snapshot over a local broker. Same-run baselines: a "
        "bare SQLite executemany of the same rows with the store's settings (schema, indexes, "
        "WAL, synchronous=FULL, page cache; one transaction), in-process and as a process, and "
        "a bare HMAC + SELECT by digest. Prints figures and RESULT lines; asserts nothing."
    )
    parser.add_argument(
        "--codes",
        "--sizes",
        dest="sizes",
        type=_sizes,
        default=[10_000, 100_000, 1_000_000],
        metavar="N,N,...",
        help="snapshot sizes in codes, comma-separated (10000,100000,1000000); the replace, "
        "the deltas and the lookups use the largest",
    )
    parser.add_argument(
        "--lookups",
        type=int,
        default=2000,
        metavar="N",
        help="timed lookups of random existing codes, each beside a baseline lookup (2000)",
    )
    parser.add_argument(
        "--unknown",
        type=int,
        default=200,
        metavar="N",
        help="timed lookups of codes that were never issued (200)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=0,
        metavar="N",
        help="timed runs of each snapshot measurement per size; the median is printed "
        "(default: 5 up to 10000 codes, 3 up to 100000, 1 above)",
    )
    parser.add_argument(
        "--deltas",
        type=int,
        default=11,
        metavar="N",
        help="100-code deltas applied in a chain on the largest snapshot (11)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, metavar="N", help="seed of the generated codes (1)"
    )
    parser.add_argument(
        "--skip-process", action="store_true",
        help="leave out the whole-process path (lockerd import-bundle as a process)",
    )
    parser.add_argument(
        "--skip-mqtt", action="store_true",
        help="leave out the MQTT path (a lockerd run process, the snapshot over a broker)",
    )
    parser.add_argument(
        "--process-only", action="store_true",
        help="only the whole-process path: build the snapshots (and the replacing one at the "
        "largest size) and time `lockerd import-bundle` beside the bare-insert process; no "
        "in-process figures, no MQTT; --runs runs of each (default 1)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="put the databases under PATH, an empty or new directory, and keep those of the "
        "largest snapshot (default: a temporary directory, removed at exit); choose the disk "
        "whose fsync to measure",
    )
    args = parser.parse_args(argv)
    if args.lookups < 1 or args.unknown < 0 or args.runs < 0 or args.deltas < 1:
        parser.error("--lookups and --deltas must be at least 1, --unknown and --runs at least 0")
    if args.sizes[-1] < 2:
        parser.error("the largest size must be at least 2 codes (its replace keeps half)")
    return args


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > CODE_SPACE // 2:
        raise argparse.ArgumentTypeError(f"sizes must be between 1 and {CODE_SPACE // 2}")
    return sizes


def runs_for(size: int, args: argparse.Namespace) -> int:
    if args.runs:
        return int(args.runs)
    return 5 if size <= 10_000 else 3 if size <= 100_000 else 1


# -- the bank's material ----------------------------------------------------------------------


@dataclass
class Material:
    """What the backend holds (keys, plain codes) and what the bank trusts (the keyring)."""

    kit: BankKit
    keyring_raw: bytes
    keyring: Keyring
    codes: list[str]
    """Distinct plain codes; snapshots of N codes use the first N, deltas the ones after."""
    rng: random.Random
    issued_at: datetime = field(default_factory=utcnow)

    @property
    def codes_role(self) -> RoleKeys:
        return self.keyring.roles["codes"]

    def entries(self, first: int, count: int) -> list[CodeEntry]:
        """Codes first .. first+count-1, digests under the bank's code key, expiries spread
        over two weeks (whole seconds, as on the wire) so that no two parse alike."""
        start = self.issued_at.replace(microsecond=0)
        out: list[CodeEntry] = []
        for n in range(first, first + count):
            out.append(
                CodeEntry(
                    id=f"p-{n}",
                    kind="pickup",
                    digest=code_digest(self.kit.code_key, self.kit.locker_id, self.codes[n]),
                    not_after=start + timedelta(days=1, seconds=self.rng.randrange(14 * 86400)),
                    compartment=str(n % COMPARTMENTS + 1),
                    parcel_id=f"PX{n}",
                )
            )
        return out

    def sign(
        self, entries: Sequence[CodeEntry], *, version: int, base_version: int | None
    ) -> tuple[bytes, int]:
        """The signed envelope and the size of its payload in bytes."""
        payload = build_bundle_payload(
            locker_id=self.kit.locker_id,
            version=version,
            base_version=base_version,
            issued_at=self.issued_at,
            expires_at=self.issued_at + timedelta(days=30),
            upsert=entries,
        )
        return sign_envelope(CODES_PAYLOAD_TYPE, payload, [self.kit.codes_key]), len(payload)


def make_material(work: Path, total: int, seed: int) -> Material:
    kit = make_bank(work / "bank", compartments=COMPARTMENTS, socket=False, import_files=False)
    raw = kit.keyring()
    root = RoleKeys.from_keys([kit.root_key.public_key()], 1)
    keyring = accept_keyring(raw, trusted_root=root, current_version=0, now=utcnow())
    rng = random.Random(seed)
    codes = [f"{n:08d}" for n in rng.sample(range(CODE_SPACE), total)]
    return Material(kit=kit, keyring_raw=raw, keyring=keyring, codes=codes, rng=rng)


def rows_of(entries: Sequence[CodeEntry]) -> list[Row]:
    """The rows CodeStore.apply inserts for these entries, in the same order."""
    return [
        (
            e.digest, e.id, e.kind, e.compartment, e.parcel_id,
            None if e.not_before is None else int(e.not_before.timestamp()),
            int(e.not_after.timestamp()), e.max_uses,
        )
        for e in entries
    ]


# -- databases --------------------------------------------------------------------------------


class Files:
    """Fresh database paths in the work directory, each removed (with -wal, -shm) on drop;
    with `inputs`, the signed snapshots and their rows are saved there too, for the
    whole-process and MQTT paths."""

    def __init__(self, work: Path, *, inputs: bool) -> None:
        self.work = work
        self.count = 0
        self.inputs = inputs

    def save(self, kind: str, size: int, raw: bytes, rows: Sequence[Row]) -> None:
        if self.inputs:
            bundlepaths.save_inputs(self.work, kind, size, raw, rows)

    def fresh(self, name: str) -> Path:
        self.count += 1
        return self.work / f"{self.count:03d}-{name}.db"

    @staticmethod
    def drop(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def bare_connect(path: Path) -> sqlite3.Connection:
    """A bare connection to a database with the store's schema and indexes (made by
    open_database if it does not exist yet), with the store's pragmas (WAL,
    synchronous=FULL) and the page cache CodeStore.apply sets."""
    if not path.exists():
        open_database(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA cache_size=-{APPLY_CACHE_KIB}")
    return conn


def bare_insert(conn: sqlite3.Connection, rows: Sequence[Row], *, replace: bool = False) -> None:
    """One transaction, an executemany per table of the code cache (codes and its key tables,
    code_ids and code_parcels: what the store writes), after deleting every code for a
    replace: the commit (fsync, WAL checkpoint) included."""
    conn.execute("BEGIN IMMEDIATE")
    if replace:
        for table in ("codes", "code_ids", "code_parcels"):
            conn.execute(f"DELETE FROM {table}")
    conn.executemany("INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.executemany("INSERT INTO code_ids VALUES (?, ?)", [(r[1], r[0]) for r in rows])
    conn.executemany("INSERT INTO code_parcels VALUES (?, ?)",
                     [(r[4], r[0]) for r in rows if r[4] is not None])
    conn.execute("COMMIT")


def copy_database(db: Database, path: Path) -> sqlite3.Connection:
    """A copy of `db` at `path` (SQLite's backup API), opened as `bare_connect` opens one:
    the bare baseline of a replace starts from the very rows and pages the store holds."""
    target = sqlite3.connect(path)
    try:
        db.conn.backup(target)
    finally:
        target.close()
    return bare_connect(path)


def make_cache(db: Database, m: Material) -> CodeCache:
    """A CodeCache as the daemon builds it (lockerd/services/banksetup.py build_cache),
    keyring loaded."""
    cache = CodeCache(
        db=db,
        codes=CodeStore(db),
        events=EventLog(db),
        locker_id=m.kit.locker_id,
        pinned_root=RoleKeys.from_keys([m.kit.root_key.public_key()], 1),
        now=utcnow,
        monotonic=time.monotonic,
    )
    cache.load_keyring(m.keyring_raw, source="bench")
    return cache


@dataclass(frozen=True)
class Sample:
    wall: float
    """Seconds of time.perf_counter."""
    cpu: float
    """Seconds of time.process_time (this process, user + system): wall minus cpu is time
    spent waiting (fsync, or another process holding the CPU)."""


def timed(fn: Callable[[], T]) -> tuple[Sample, T]:
    """Run fn once after a gc.collect() (untimed) so no garbage of the previous step is
    collected in this one."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return Sample(t1 - t0, c1 - c0), result


# -- memory -----------------------------------------------------------------------------------


def peak_rss_kib() -> int:
    """ru_maxrss of this process (KiB on Linux): its peak RSS since start or the last reset."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: `5` to /proc/self/clear_refs).
    ru_maxrss then reports the peak since the reset."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


# -- measurements -----------------------------------------------------------------------------


@dataclass
class SizeResult:
    size: int
    runs: int
    payload_bytes: int
    envelope_bytes: int
    build_s: float
    build_peak_kib: int
    """getrusage peak RSS right after building (before any reset): the build's peak, or an
    earlier one."""
    bare: list[Sample] = field(default_factory=list)
    verify: list[Sample] = field(default_factory=list)
    apply: list[Sample] = field(default_factory=list)
    load: list[Sample] = field(default_factory=list)
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Largest size only: per step, (RSS before, peak RSS during) in KiB."""


@dataclass
class Kept:
    """The databases of the largest snapshot, kept for the replace, the deltas and the
    lookups."""

    db: Database
    """Loaded through CodeCache.load_bundle: the daemon's database, as after an import."""
    bare: sqlite3.Connection | None
    """The bare baseline's database: a copy of `db` made just before the replace."""
    version: int
    size: int

    @property
    def bare_conn(self) -> sqlite3.Connection:
        assert self.bare is not None
        return self.bare


def measure_size(
    m: Material, files: Files, size: int, runs: int, largest: bool
) -> tuple[SizeResult, Kept | None]:
    t0 = time.perf_counter()
    entries = m.entries(0, size)
    raw, payload_bytes = m.sign(entries, version=1, base_version=None)
    rows = rows_of(entries)
    del entries
    files.save("snapshot", size, raw, rows)
    result = SizeResult(
        size, runs, payload_bytes, len(raw), time.perf_counter() - t0, peak_rss_kib()
    )
    kept: Kept | None = None
    track = largest and reset_peak_rss()

    def step(name: str, fn: Callable[[], T]) -> tuple[Sample, T]:
        gc.collect()
        if track:
            reset_peak_rss()
        before = current_rss_kib()
        elapsed, value = timed(fn)
        if track:
            old = result.peaks.get(name, (0, 0))
            result.peaks[name] = (max(old[0], before), max(old[1], peak_rss_kib()))
        return elapsed, value

    def bare() -> None:
        path = files.fresh(f"bare-{size}")
        conn = bare_connect(path)
        elapsed, _ = step("bare", partial(bare_insert, conn, rows))
        result.bare.append(elapsed)
        conn.close()
        files.drop(path)

    for run in range(runs):
        last = run == runs - 1
        # The baseline before the three daemon figures in even runs and after them in odd
        # ones, so that neither side always runs first; a single run has it both before and
        # after. All on fresh files.
        if run % 2 == 0:
            bare()

        elapsed, bundle = step(
            "verify",
            lambda: verify_bundle(
                raw,
                codes_role=m.codes_role,
                keyring_expires_at=m.keyring.expires_at,
                locker_id=m.kit.locker_id,
                held_version=0,
                now=utcnow(),
            ),
        )
        result.verify.append(elapsed)

        path = files.fresh(f"apply-{size}")
        db = open_database(path)
        elapsed, _ = step("apply", partial(CodeStore(db).apply, bundle))
        result.apply.append(elapsed)
        db.close()
        files.drop(path)
        del bundle

        path = files.fresh(f"load-{size}")
        db = open_database(path)
        cache = make_cache(db, m)
        elapsed, _ = step("load", partial(cache.load_bundle, raw, source="bench"))
        result.load.append(elapsed)
        if last and largest:
            kept = Kept(db=db, bare=None, version=1, size=size)
        else:
            db.close()
            files.drop(path)
        if run % 2 == 1 or runs == 1:
            bare()
    return result, kept


@dataclass
class ReplaceResult:
    size: int
    same: int
    """Codes of the new snapshot that the held one had too."""
    bare: Sample
    apply: Sample


def measure_replace(m: Material, files: Files, kept: Kept) -> ReplaceResult:
    """A snapshot of N codes over the N held (the second half of the held codes and as many
    new ones): CodeStore.apply on the kept database, beside a bare DELETE + insert of the
    same rows in one transaction on a copy of it made just before. Verified untimed."""
    size = kept.size
    first = size // 2
    entries = m.entries(first, size)
    raw, _ = m.sign(entries, version=kept.version + 1, base_version=None)
    rows = rows_of(entries)
    del entries
    files.save("replace", size, raw, rows)
    kept.bare = copy_database(kept.db, files.fresh(f"bare-replace-{size}"))
    bundle = verify_bundle(
        raw, codes_role=m.codes_role, keyring_expires_at=m.keyring.expires_at,
        locker_id=m.kit.locker_id, held_version=kept.version, now=utcnow(),
    )
    bare, _ = timed(partial(bare_insert, kept.bare, rows, replace=True))
    applied, _ = timed(partial(CodeStore(kept.db).apply, bundle))
    kept.version += 1
    return ReplaceResult(size, size - first, bare, applied)


@dataclass
class DeltaResult:
    bare: list[float] = field(default_factory=list)
    verify: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


def measure_deltas(m: Material, kept: Kept, first: int, count: int) -> DeltaResult:
    """`count` deltas of 100 new codes each, each version on the one before; the baseline
    inserts the same rows into the bare copy, with the same settings."""
    store = CodeStore(kept.db)
    out = DeltaResult()
    for i in range(count):
        entries = m.entries(first + i * DELTA_CODES, DELTA_CODES)
        version = kept.version + 1
        raw, _ = m.sign(entries, version=version, base_version=kept.version)
        rows = rows_of(entries)
        gc.collect()
        t0 = time.perf_counter()
        bare_insert(kept.bare_conn, rows)
        out.bare.append(time.perf_counter() - t0)
        gc.collect()
        t0 = time.perf_counter()
        bundle = verify_bundle(
            raw,
            codes_role=m.codes_role,
            keyring_expires_at=m.keyring.expires_at,
            locker_id=m.kit.locker_id,
            held_version=kept.version,
            now=utcnow(),
        )
        t1 = time.perf_counter()
        store.apply(bundle)
        t2 = time.perf_counter()
        out.verify.append(t1 - t0)
        out.apply.append(t2 - t1)
        out.total.append(t2 - t0)
        kept.version = version
    return out


@dataclass
class LookupResult:
    held: int
    cache_size: int  # PRAGMA cache_size of both connections (negative: KiB)
    bare_known: list[float] = field(default_factory=list)
    daemon_known: list[float] = field(default_factory=list)
    bare_unknown: list[float] = field(default_factory=list)
    daemon_unknown: list[float] = field(default_factory=list)


def measure_lookups(m: Material, kept: Kept, issued: range, known: int,
                    unknown: int) -> LookupResult:
    """Each code looked up the daemon's way and the bare way, alternately (which one goes
    first alternates too), so both see the same caches and the same machine moments.
    `issued`: the indexes of the codes held."""
    store = CodeStore(kept.db)
    key, locker = m.kit.code_key, m.kit.locker_id
    bare = kept.bare_conn
    select = "SELECT * FROM codes WHERE digest = ?"
    # The page cache the store's connection looks codes up with (SQLite's default, 2 MiB,
    # as the daemon's connections have it), for the bare connection too: the bare insert's
    # 64 MiB cache holds every interior page of a million codes, 2 MiB does not.
    cache_size = int(kept.db.conn.execute("PRAGMA cache_size").fetchone()[0])
    bare.execute(f"PRAGMA cache_size={cache_size}")
    result = LookupResult(held=store.count(), cache_size=cache_size)

    def daemon_way(code: str) -> tuple[float, Any]:
        t0 = time.perf_counter()
        record = store.lookup(code_digest(key, locker, code))
        return time.perf_counter() - t0, record

    def bare_way(code: str) -> tuple[float, Any]:
        t0 = time.perf_counter()
        digest = hmac.new(key, (locker + "\n" + code).encode("utf-8"), hashlib.sha256).hexdigest()
        row = bare.execute(select, (digest,)).fetchone()
        return time.perf_counter() - t0, row

    rng = random.Random(m.rng.random())
    known_codes = [m.codes[i] for i in rng.sample(issued, min(known, len(issued)))]
    unknown_codes = m.codes[-unknown:] if unknown else []
    # Warm-up, untimed: the statements are prepared and the code paths imported.
    for code in known_codes[:50]:
        daemon_way(code)
        bare_way(code)
    gc.collect()
    for codes, daemon_samples, bare_samples, found in (
        (known_codes, result.daemon_known, result.bare_known, True),
        (unknown_codes, result.daemon_unknown, result.bare_unknown, False),
    ):
        for i, code in enumerate(codes):
            pair = (daemon_way, bare_way) if i % 2 == 0 else (bare_way, daemon_way)
            for way in pair:
                elapsed, hit = way(code)
                if (hit is not None) != found:
                    raise RuntimeError(f"code {code}: found={hit is not None}, expected {found}")
                (daemon_samples if way is daemon_way else bare_samples).append(elapsed)
    return result


# -- output -----------------------------------------------------------------------------------


def med(values: Sequence[Sample]) -> float:
    """Median wall time of the runs."""
    return statistics.median(v.wall for v in values)


def med_cpu(values: Sequence[Sample]) -> float:
    return statistics.median(v.cpu for v in values)


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def report_size(r: SizeResult) -> None:
    bare = med(r.bare)
    print(
        f"snapshot of {r.size:,} codes: payload {r.payload_bytes:,} bytes, envelope "
        f"{r.envelope_bytes:,} bytes (built and signed in {r.build_s:.1f} s, not timed); "
        f"median of {r.runs} run{'s' if r.runs > 1 else ''} ({len(r.bare)} of the baseline, "
        "before and after the daemon's figures in turn)"
    )
    print(f"  {'':<52}{'wall s':>9}{'cpu s':>8}{'us/code':>10}{'x bare':>9}")
    lines = (
        ("baseline: bare insert, the store's settings, 1 txn", r.bare),
        ("(a) verify_bundle (parse + signature + checks)", r.verify),
        ("(b) CodeStore.apply (empty database)", r.apply),
        ("(c) CodeCache.load_bundle (verify + apply + event)", r.load),
    )
    for label, values in lines:
        s = med(values)
        print(
            f"  {label:<52}{s:>9.3f}{med_cpu(values):>8.3f}{s / r.size * 1e6:>10.2f}"
            f"{s / bare:>9.2f}"
        )
    print()


def report_linearity(results: Sequence[SizeResult]) -> None:
    print("per-code cost in us (median time / N); a linear cost keeps each row flat")
    print(f"  {'':<36}" + "".join(f"{r.size:>12,}" for r in results))
    for label, attr in (
        ("bare insert", "bare"),
        ("(a) verify_bundle", "verify"),
        ("(b) CodeStore.apply", "apply"),
        ("(c) CodeCache.load_bundle", "load"),
    ):
        cells = "".join(f"{med(getattr(r, attr)) / r.size * 1e6:>12.2f}" for r in results)
        print(f"  {label:<36}{cells}")
    print()


def ms_row(label: str, values: Sequence[float], base: Sequence[float]) -> str:
    s = Summary.of(values)
    ratio = s.median / Summary.of(base).median
    ms = [v * 1000 for v in (s.median, s.p99, s.min, s.max)]
    return (
        f"  {label:<52}{s.n:>5}{ms[0]:>9.3f}{ms[1]:>9.3f}{ms[2]:>9.3f}{ms[3]:>9.3f}{ratio:>8.2f}"
    )


def us_row(label: str, values: Sequence[float], base: Sequence[float]) -> str:
    s = Summary.of(values)
    ratio = s.median / Summary.of(base).median
    us = [v * 1e6 for v in (s.median, s.p99, s.min, s.max)]
    return (
        f"  {label:<52}{s.n:>5}{us[0]:>9.1f}{us[1]:>9.1f}{us[2]:>9.1f}{us[3]:>9.1f}{ratio:>8.2f}"
    )


def report_replace(r: ReplaceResult) -> None:
    print(f"snapshot of {r.size:,} codes replacing the {r.size:,} held ({r.same:,} of them held "
          "already), verified untimed; one run")
    print(f"  {'':<52}{'wall s':>9}{'cpu s':>8}{'us/code':>10}{'x bare':>9}")
    for label, sample in (
        ("baseline: bare DELETE + insert, a copy of the db", r.bare),
        ("CodeStore.apply (replace)", r.apply),
    ):
        print(f"  {label:<52}{sample.wall:>9.3f}{sample.cpu:>8.3f}"
              f"{sample.wall / r.size * 1e6:>10.2f}{sample.wall / r.bare.wall:>9.2f}")
    print()


def report_deltas(d: DeltaResult, held: int) -> None:
    print(
        f"delta of {DELTA_CODES} new codes on the {held:,}-code snapshot, {len(d.total)} deltas "
        "in a chain (version k on base k-1)"
    )
    print(f"  {'':<52}{'n':>5}{'median':>9}{'p99':>9}{'min':>9}{'max':>9}{'x bare':>8}  (ms)")
    print(ms_row(f"baseline: bare insert of {DELTA_CODES} rows (1 txn)", d.bare, d.bare))
    print(ms_row("verify_bundle", d.verify, d.bare))
    print(ms_row("CodeStore.apply", d.apply, d.bare))
    print(ms_row("verify + apply", d.total, d.bare))
    print()


def report_lookups(r: LookupResult) -> None:
    cache = f"{-r.cache_size} KiB" if r.cache_size < 0 else f"{r.cache_size} pages"
    print(f"lookup of one entered code among {r.held:,} codes held (both connections with "
          f"the store's page cache, {cache})")
    print(f"  {'':<52}{'n':>5}{'median':>9}{'p99':>9}{'min':>9}{'max':>9}{'x bare':>8}  (us)")
    print(us_row("baseline: hmac.new().hexdigest() + SELECT *, issued", r.bare_known, r.bare_known))
    print(us_row("code_digest + CodeStore.lookup, issued", r.daemon_known, r.bare_known))
    if r.daemon_unknown:
        print(
            us_row("baseline: the same, never issued", r.bare_unknown, r.bare_unknown)
        )
        print(us_row("code_digest + CodeStore.lookup, never issued", r.daemon_unknown,
                     r.bare_unknown))
    print()


def report_memory(r: SizeResult, before_kib: int, lifetime_kib: int) -> None:
    print(f"memory, {r.size:,} codes (payload {r.payload_bytes:,} bytes, envelope "
          f"{r.envelope_bytes:,} bytes)")
    if r.peaks:
        print("  peak RSS during each step (getrusage ru_maxrss after a reset through "
              "/proc/self/clear_refs), and RSS before it:")
        names = {
            "bare": "bare insert",
            "verify": "(a) verify_bundle",
            "apply": "(b) CodeStore.apply (the verified bundle is held)",
            "load": "(c) CodeCache.load_bundle",
        }
        for key, label in names.items():
            if key in r.peaks:
                start, peak = r.peaks[key]
                print(f"    {label:<50} before {mib(start):>10}  peak {mib(peak):>10}  "
                      f"({(peak - start) / 1024:+,.0f} MiB)")
    else:
        print("  (could not reset the peak through /proc/self/clear_refs: no per-step peaks)")
    print(f"  RSS before building the {r.size:,}-code snapshot {mib(before_kib)} (peak so far "
          f"{mib(lifetime_kib)}); building and signing it, untimed, peaked at "
          f"{mib(r.build_peak_kib)}")
    overall = max([r.build_peak_kib, peak_rss_kib(), *(peak for _, peak in r.peaks.values())])
    print(f"  peak RSS of this process (getrusage ru_maxrss) after the {r.size:,}-code case: "
          f"{mib(overall)}")
    print()


def report_targets(results: Sequence[SizeResult], replace: ReplaceResult, deltas: DeltaResult,
                   lookups: LookupResult) -> None:
    big = results[-1]
    n = f"{big.size:,}".replace(",", " ")
    print("targets (printed, not asserted):")
    report(f"bundle_apply apply {n} empty",
           f"CodeStore.apply {med(big.apply):.3f} s against a bare insert {med(big.bare):.3f} s",
           med(big.apply) / med(big.bare), APPLY_TARGET)
    report(f"bundle_apply load_bundle {n} empty",
           f"CodeCache.load_bundle {med(big.load):.3f} s against a bare insert "
           f"{med(big.bare):.3f} s", med(big.load) / med(big.bare), APPLY_TARGET)
    report(f"bundle_apply apply {n} replace",
           f"CodeStore.apply {replace.apply.wall:.3f} s against a bare DELETE + insert "
           f"{replace.bare.wall:.3f} s", replace.apply.wall / replace.bare.wall, APPLY_TARGET)
    total, bare = statistics.median(deltas.total), statistics.median(deltas.bare)
    report(f"bundle_apply delta {DELTA_CODES} on {n}",
           f"verify + apply {total * 1000:.2f} ms against a bare insert {bare * 1000:.2f} ms",
           total / bare, APPLY_TARGET)
    daemon_us = statistics.median(lookups.daemon_known) * 1e6
    bare_us = statistics.median(lookups.bare_known) * 1e6
    report(f"bundle_apply lookup among {lookups.held:,}".replace(",", " "),
           f"code_digest + CodeStore.lookup {daemon_us:.1f} us against a bare HMAC + SELECT "
           f"{bare_us:.1f} us", daemon_us / bare_us, LOOKUP_TARGET)
    if len(results) > 1:
        first = results[0]
        for label, attr in (
            ("bare insert", "bare"),
            ("verify_bundle", "verify"),
            ("CodeStore.apply", "apply"),
            ("load_bundle", "load"),
        ):
            a = med(getattr(first, attr)) / first.size
            b = med(getattr(big, attr)) / big.size
            print(f"  linearity of {label}: per-code cost at {big.size:,} is {b / a:.2f}x its "
                  f"cost at {first.size:,}")


# -- main -------------------------------------------------------------------------------------


def run_process_only(args: argparse.Namespace, work: Path) -> None:
    """--process-only: the snapshots' files, then `lockerd import-bundle` beside the
    bare-insert process, --runs times each (fresh banks every run)."""
    started = time.perf_counter()
    largest = args.sizes[-1]
    m = make_material(work, largest + largest // 2, args.seed)
    files = Files(work, inputs=True)
    print(f"bundle_apply --process-only: snapshots of {', '.join(f'{n:,}' for n in args.sizes)}"
          f" pickup codes, the largest replaced by another; {args.runs or 1} run(s) each")
    print(f"  {machine_line()}")
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; SQLite {sqlite3.sqlite_version}; "
          f"databases in {work} ({filesystem_of(work)}); load average {load_start}")
    print(flush=True)
    for size in args.sizes:
        entries = m.entries(0, size)
        raw, _ = m.sign(entries, version=1, base_version=None)
        files.save("snapshot", size, raw, rows_of(entries))
        del entries, raw
    entries = m.entries(largest // 2, largest)
    raw, _ = m.sign(entries, version=2, base_version=None)
    files.save("replace", largest, raw, rows_of(entries))
    del entries, raw
    gc.collect()
    for run in range(args.runs or 1):
        results = bundlepaths.measure_process(m.kit, work, args.sizes, APPLY_CACHE_KIB,
                                              run=run)
        bundlepaths.report_process(results)
    print(f"  whole run: {time.perf_counter() - started:.0f} s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the start: {load_start})")


def run(args: argparse.Namespace, work: Path) -> None:
    """Every measurement and its report, in `work`."""
    if args.process_only:
        run_process_only(args, work)
        return
    started = time.perf_counter()
    kept: Kept | None = None
    try:
        largest = args.sizes[-1]
        # Codes 0..N-1 are the snapshot, N/2..3N/2-1 the one that replaces it, the deltas'
        # come after, and the last --unknown are never issued.
        total = largest + largest // 2 + args.deltas * DELTA_CODES + args.unknown
        m = make_material(work, total, args.seed)
        files = Files(work, inputs=not (args.skip_process and args.skip_mqtt))
        print(
            f"bundle_apply: snapshots of {', '.join(f'{n:,}' for n in args.sizes)} pickup codes; "
            f"{args.deltas} deltas of {DELTA_CODES}; {args.lookups} + {args.unknown} lookups"
        )
        print(f"  {machine_line()}")
        load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; SQLite {sqlite3.sqlite_version}; "
            f"databases in {work} ({filesystem_of(work)}); load average {load_start}"
        )
        print("  in-process times: time.perf_counter, gc.collect() before each; each "
              "snapshot measurement on a fresh database file; the bare inserts on databases "
              f"made by open_database, page cache {APPLY_CACHE_KIB} KiB as CodeStore.apply's")
        print(flush=True)
        results: list[SizeResult] = []
        before_kib = lifetime_kib = 0
        for size in args.sizes:
            is_largest = size == largest
            if is_largest:
                gc.collect()
                before_kib, lifetime_kib = current_rss_kib(), peak_rss_kib()
            t0 = time.perf_counter()
            result, got = measure_size(m, files, size, runs_for(size, args), is_largest)
            results.append(result)
            report_size(result)
            print(f"  ({size:,} codes took {time.perf_counter() - t0:.0f} s in all)")
            print(flush=True)
            if got is not None:
                kept = got
        assert kept is not None
        report_linearity(results)
        report_memory(results[-1], before_kib, lifetime_kib)
        replace = measure_replace(m, files, kept)
        report_replace(replace)
        first_delta = largest // 2 + largest
        deltas = measure_deltas(m, kept, first_delta, args.deltas)
        report_deltas(deltas, largest)
        lookups = measure_lookups(
            m, kept, range(largest // 2, first_delta + args.deltas * DELTA_CODES),
            args.lookups, args.unknown,
        )
        report_lookups(lookups)
        report_targets(results, replace, deltas, lookups)
        kept.db.close()
        kept.bare_conn.close()
        kept = None
        if not args.skip_process:
            bundlepaths.report_process(bundlepaths.measure_process(
                m.kit, work, args.sizes, APPLY_CACHE_KIB))
        if not args.skip_mqtt:
            bundlepaths.report_mqtt(bundlepaths.measure_mqtt(m.kit, work, args.sizes,
                                                             APPLY_CACHE_KIB))
        print(
            f"\n  whole run: {time.perf_counter() - started:.0f} s; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the start: {load_start})"
        )
    finally:
        # Closed before the work directory goes.
        if kept is not None:
            kept.db.close()
            if kept.bare is not None:
                kept.bare.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The daemon logs one line per bundle: to the work directory's log file.
    return run_in_work_directory("bundle_apply", args.dir, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
