"""Verifying and applying big codes bundles, and looking a code up among a million, beside bare
SQLite and HMAC baselines measured in the same run. Prints figures; asserts nothing.

Everything runs in this process, on the daemon's own functions (verify_bundle, CodeStore,
CodeCache) and databases opened with its open_database; no daemon subprocess is needed."""

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

from benchlib import Summary, filesystem_of, machine_line, run_in_work_directory

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

Row = tuple[str, str, str, str | None, str | None, int | None, int, int]
"""A row of the `codes` table, in its column order (what CodeStore.apply inserts)."""

BARE_TABLE = """
CREATE TABLE codes (
    digest      TEXT PRIMARY KEY,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    compartment TEXT,
    parcel_id   TEXT,
    not_before  INTEGER,
    not_after   INTEGER NOT NULL,
    max_uses    INTEGER NOT NULL
) WITHOUT ROWID
"""
"""The `codes` table of lockerd/store/db.py without the UNIQUE constraint on `id`."""

BARE_TABLE_UNIQUE_ID = BARE_TABLE.replace("id          TEXT NOT NULL,", "id TEXT NOT NULL UNIQUE,")
"""Exactly the `codes` table of lockerd/store/db.py (UNIQUE(id) is a second B-tree)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build signed snapshots of N pickup codes (untimed), then time, in-process: "
        "verify_bundle alone, CodeStore.apply alone on a fresh database, and the whole "
        "CodeCache.load_bundle on another; then a 100-code delta on the largest snapshot; then "
        "the lookup of one entered code (code_digest + CodeStore.lookup) among the largest set. "
        "Same-run baselines: a bare SQLite executemany of the same rows (WAL, synchronous=FULL, "
        "one transaction) and a bare HMAC + SELECT by digest. Prints figures; asserts nothing."
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=[10_000, 100_000, 1_000_000],
        metavar="N,N,...",
        help="snapshot sizes in codes, comma-separated (10000,100000,1000000); the delta and "
        "the lookups use the largest",
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
    """Fresh database paths in the work directory, each removed (with -wal, -shm) on drop."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0

    def fresh(self, name: str) -> Path:
        self.count += 1
        return self.work / f"{self.count:03d}-{name}.db"

    @staticmethod
    def drop(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def bare_connect(path: Path, table: str = BARE_TABLE) -> sqlite3.Connection:
    """A bare connection with the daemon's pragmas (WAL, synchronous=FULL) and one table."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(table)
    return conn


def bare_insert(conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
    """One transaction, one executemany: the commit (fsync, WAL checkpoint) included."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")


def make_cache(db: Database, m: Material) -> CodeCache:
    """A CodeCache as the daemon builds it (lockerd/app.py build_cache), keyring loaded."""
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
    bare_unique: list[Sample] = field(default_factory=list)
    verify: list[Sample] = field(default_factory=list)
    apply: list[Sample] = field(default_factory=list)
    load: list[Sample] = field(default_factory=list)
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Largest size only: per step, (RSS before, peak RSS during) in KiB."""


@dataclass
class Kept:
    """The databases of the largest snapshot, kept for the delta and the lookups."""

    db: Database
    """Loaded through CodeCache.load_bundle: the daemon's database, as after an import."""
    bare: sqlite3.Connection
    """The bare-insert baseline's database, same rows."""
    version: int


def measure_size(
    m: Material, files: Files, size: int, runs: int, largest: bool
) -> tuple[SizeResult, Kept | None]:
    t0 = time.perf_counter()
    entries = m.entries(0, size)
    raw, payload_bytes = m.sign(entries, version=1, base_version=None)
    rows = rows_of(entries)
    del entries
    result = SizeResult(
        size, runs, payload_bytes, len(raw), time.perf_counter() - t0, peak_rss_kib()
    )
    kept: Kept | None = None
    kept_bare: sqlite3.Connection | None = None
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

    for run in range(runs):
        last = run == runs - 1
        # Baselines first, then the three daemon figures; all on fresh files.
        for table, samples, name in (
            (BARE_TABLE, result.bare, "bare"),
            (BARE_TABLE_UNIQUE_ID, result.bare_unique, "bare_unique"),
        ):
            path = files.fresh(f"{name}-{size}")
            conn = bare_connect(path, table)
            elapsed, _ = step(name, partial(bare_insert, conn, rows))
            samples.append(elapsed)
            if last and largest and table is BARE_TABLE:
                kept_bare = conn
            else:
                conn.close()
                files.drop(path)

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
        if last and kept_bare is not None:
            kept = Kept(db=db, bare=kept_bare, version=1)
        else:
            db.close()
            files.drop(path)
    return result, kept


@dataclass
class DeltaResult:
    bare: list[float] = field(default_factory=list)
    verify: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


def measure_deltas(m: Material, kept: Kept, first: int, count: int) -> DeltaResult:
    """`count` deltas of 100 new codes each, versions 2, 3, ... each on the one before."""
    store = CodeStore(kept.db)
    out = DeltaResult()
    for i in range(count):
        entries = m.entries(first + i * DELTA_CODES, DELTA_CODES)
        version = kept.version + 1
        raw, _ = m.sign(entries, version=version, base_version=kept.version)
        rows = rows_of(entries)
        gc.collect()
        t0 = time.perf_counter()
        bare_insert(kept.bare, rows)
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
    bare_known: list[float] = field(default_factory=list)
    daemon_known: list[float] = field(default_factory=list)
    bare_unknown: list[float] = field(default_factory=list)
    daemon_unknown: list[float] = field(default_factory=list)


def measure_lookups(m: Material, kept: Kept, issued: int, known: int, unknown: int) -> LookupResult:
    """Each code looked up the daemon's way and the bare way, alternately (which one goes
    first alternates too), so both see the same caches and the same machine moments."""
    store = CodeStore(kept.db)
    key, locker = m.kit.code_key, m.kit.locker_id
    bare = kept.bare
    select = "SELECT * FROM codes WHERE digest = ?"
    result = LookupResult(held=store.count())

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
    known_codes = [m.codes[i] for i in rng.sample(range(issued), min(known, issued))]
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
        f"median of {r.runs} run{'s' if r.runs > 1 else ''}"
    )
    print(f"  {'':<52}{'wall s':>9}{'cpu s':>8}{'us/code':>10}{'x bare':>9}")
    lines = (
        ("baseline: bare SQLite insert (WAL, FULL, 1 txn)", r.bare),
        ("baseline: the same with UNIQUE(id), as `codes`", r.bare_unique),
        ("(a) verify_bundle (parse + signature + checks)", r.verify),
        ("(b) CodeStore.apply (fresh database)", r.apply),
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
        ("bare insert with UNIQUE(id)", "bare_unique"),
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
    print(f"lookup of one entered code among {r.held:,} codes held")
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
            "bare_unique": "bare insert with UNIQUE(id)",
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


def report_targets(results: Sequence[SizeResult], lookups: LookupResult) -> None:
    big = results[-1]
    apply_x = med(big.apply) / med(big.bare)
    load_x = med(big.load) / med(big.bare)
    look_x = statistics.median(lookups.daemon_known) / statistics.median(lookups.bare_known)
    print("targets of the issue (printed, not asserted):")
    print(f"  apply <= 3x bare insert at {big.size:,}: CodeStore.apply {apply_x:.2f}x, "
          f"whole load_bundle {load_x:.2f}x")
    print(f"  lookup <= 2x bare: {look_x:.2f}x (median, issued codes)")
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


def run(args: argparse.Namespace, work: Path) -> None:
    """Every measurement and its report, in `work`."""
    started = time.perf_counter()
    kept: Kept | None = None
    try:
        largest = args.sizes[-1]
        total = largest + args.deltas * DELTA_CODES + args.unknown
        m = make_material(work, total, args.seed)
        files = Files(work)
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
        print("  every time is in-process, time.perf_counter, gc.collect() before each; each "
              "snapshot measurement on a fresh database file")
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
        deltas = measure_deltas(m, kept, largest, args.deltas)
        report_deltas(deltas, largest)
        lookups = measure_lookups(
            m, kept, largest + args.deltas * DELTA_CODES, args.lookups, args.unknown
        )
        report_lookups(lookups)
        report_targets(results, lookups)
        print(
            f"\n  whole run: {time.perf_counter() - started:.0f} s; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the start: {load_start})"
        )
    finally:
        # Closed before the work directory goes.
        if kept is not None:
            kept.db.close()
            kept.bare.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The daemon logs one line per bundle: to the work directory's log file.
    return run_in_work_directory("bundle_apply", args.dir, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
