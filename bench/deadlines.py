"""Deadlines that wait: what the code extensions cost. In-process, no daemon: the lookup of
an extended code, interleaved with the lookup of a code of the same table that was not
extended (an extension is written into codes.not_after, so they should not differ; the target
is issue 13's for a keypress with the new features on, within 1.1x); the scan for the
pickup codes of the parcels that waited (at start after downtime, or a compartment back in
service: one pass over the table); one heartbeat write beside a bare SQLite write. Prints
figures; asserts nothing."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import report

from lockerd.services.deadlines import HEARTBEAT_META
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.trust.bundle import CodeEntry, CodesBundle
from lockerd.trust.digest import code_digest

CODE_KEY = bytes(range(32))
COMPARTMENTS = 32
TARGET = 1.1
"""The lookup of an extended code within 1.1x of that of a code not extended."""


def median_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def interleaved_us(first: Callable[[], object], second: Callable[[], object],
                   repeat: int) -> tuple[float, float]:
    """Median microseconds of each, one call of each in turn (which goes first alternates),
    so both see the same caches and the same moments of the machine."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeat):
        order = ((0, first), (1, second)) if i % 2 == 0 else ((1, second), (0, first))
        for slot, fn in order:
            start = time.perf_counter()
            fn()
            times[slot].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def fill(db: Database, count: int) -> list[str]:
    now = datetime.now(UTC)
    digests = [code_digest(CODE_KEY, "L1", f"{n:08d}") for n in range(count)]
    entries = tuple(
        CodeEntry(id=f"p-{n}", kind="pickup", digest=d, not_after=now + timedelta(days=2),
                  # Spread over many banks' worth of compartments, as a real bundle's few
                  # codes per compartment: the scan finds a handful, not half the table.
                  compartment=str(n % 5000 + 1) if n % 2 else None,
                  parcel_id=f"PX{n}")
        for n, d in enumerate(digests))
    CodeStore(db).apply(CodesBundle(locker_id="L1", version=1, base_version=None,
                                    issued_at=now, expires_at=now + timedelta(days=7),
                                    upsert=entries, revoke=()))
    return digests


def run(count: int, repeat: int, directory: Path) -> None:
    db = open_database(directory / f"bench-{count}.db")
    codes = CodeStore(db)
    digests = fill(db, count)
    held = [str(n) for n in range(1, COMPARTMENTS + 1)]
    parcels = [f"PX{n}" for n in range(0, count, max(1, count // COMPARTMENTS))]
    found = codes.pickup_codes(compartments=held, parcels=parcels)
    with db.transaction() as conn:
        for code in found:
            codes.set_extension(conn, code, 3600)
    if not found:
        raise SystemExit(f"deadlines: no pickup code of the {COMPARTMENTS} compartments among "
                         f"{count} codes: give --codes a larger count")
    extended = {code.digest for code in found}
    probe_ext = found[len(found) // 2].digest
    probe = next(d for d in digests[count // 2:] + digests if d not in extended)
    with_join, before = interleaved_us(lambda: codes.lookup(probe_ext),
                                       lambda: codes.lookup(probe), repeat)
    scan = median_us(lambda: codes.pickup_codes(compartments=held, parcels=parcels),
                     max(3, repeat // 100))
    beat = median_us(lambda: db.set_meta(HEARTBEAT_META, {"at": time.time(), "run_s": 0.0,
                                                          "out_of_service_s": {}}),
                     max(3, repeat // 100))
    db.conn.execute("CREATE TABLE IF NOT EXISTS bare (k TEXT PRIMARY KEY, v TEXT)")

    def bare_write() -> None:
        with db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO bare VALUES ('k', ?)", (str(time.time()),))

    bare_w = median_us(bare_write, max(3, repeat // 100))
    print(f"{count:>9} codes: lookup {with_join:7.1f} us of an extended code, {before:7.1f} us "
          f"of one not extended ({with_join / before:.2f}x); pickup-code scan for {COMPARTMENTS} "
          f"compartments ({len(found)} codes) {scan / 1000:8.2f} ms; heartbeat write "
          f"{beat:7.1f} us (bare SQLite write {bare_w:7.1f} us)")
    report(f"deadlines lookup {count} codes",
           f"an extended code {with_join:.1f} us against {before:.1f} us not extended",
           with_join / before, TARGET)
    db.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.codes:
            run(count, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()
