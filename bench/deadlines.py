"""Deadlines that wait: what the code extensions cost. In-process, no daemon: the lookup of
an entered code once some codes are extended, beside the same lookup before any was (an
extension is written into codes.not_after, so they should not differ); the scan for the
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

from lockerd.services.deadlines import HEARTBEAT_META
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.trust.bundle import CodeEntry, CodesBundle
from lockerd.trust.digest import code_digest

CODE_KEY = bytes(range(32))
COMPARTMENTS = 32


def median_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


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
    probe = digests[count // 2]
    held = [str(n) for n in range(1, COMPARTMENTS + 1)]
    parcels = [f"PX{n}" for n in range(0, count, max(1, count // COMPARTMENTS))]
    before = median_us(lambda: codes.lookup(probe), repeat)
    found = codes.pickup_codes(compartments=held, parcels=parcels)
    with db.transaction() as conn:
        for code in found:
            codes.set_extension(conn, code, 3600)
    with_join = median_us(lambda: codes.lookup(probe), repeat)
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
    print(f"{count:>9} codes: lookup {with_join:7.1f} us with extensions, {before:7.1f} us "
          f"before any ({with_join / before:.2f}x); pickup-code scan for {COMPARTMENTS} "
          f"compartments ({len(found)} codes) {scan / 1000:8.2f} ms; heartbeat write "
          f"{beat:7.1f} us (bare SQLite write {bare_w:7.1f} us)")
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.codes:
            run(count, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()
