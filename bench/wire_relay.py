"""The minimal correct keypad-to-lock relay: the baseline of keypress_to_unlock.py.

It does the work lockerd must do between a key and an unlock frame and nothing else: read the
keypad's serial port, HMAC the code as lockerd derives its digests (PROTOCOL section 4), look
the digest up by its primary key in a SQLite file with lockerd's pragmas, commit one event row
(WAL, synchronous=FULL: one fdatasync) and write the Kerong unlock frame. Standard library only,
blocking reads, one thread. Run by the benchmark:

    python bench/wire_relay.py --keypad PTY --kerong PTY --db FILE --code-key HEX --locker L1
        --wiring '{"1": [0, 0], ...}'

It prints "ready" once its ports and database are open, and its write-ahead log is in the state
the daemon's is in (see `settle_wal`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sqlite3
import sys
import termios
import time
import tty
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    at           TEXT NOT NULL,
    compartment  TEXT,
    code_id      TEXT,
    data         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS codes (
    digest      TEXT PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    compartment TEXT,
    max_uses    INTEGER NOT NULL
) WITHOUT ROWID;
"""


def connect(path: Path) -> sqlite3.Connection:
    """The database with lockerd's pragmas (lockerd/store/db.py)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    return conn


# More than the log ever holds between two of SQLite's automatic checkpoints (1000 pages).
WAL_BYTES = 8 << 20


def settle_wal(conn: sqlite3.Connection, size: int = WAL_BYTES) -> None:
    """Grow the write-ahead log past `size` once, then checkpoint it: the relay's commits then
    overwrite the log from its start, as the daemon's do (its log is tens of MiB after the
    codes are applied, and reused from its start after each checkpoint). A fresh log grows
    by each commit instead, and on ext4 an fdatasync that also commits the file's new size
    costs more: here 1.09-1.89 ms a commit against 1.04-1.12 ms overwriting (medians)."""
    conn.execute("CREATE TABLE IF NOT EXISTS wal_fill (b BLOB)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO wal_fill VALUES (zeroblob(?))", (size,))
    conn.execute("COMMIT")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM wal_fill")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


def fill(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """Write the codes (digest, id, compartment) the relay will look up."""
    conn = connect(path)
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO codes VALUES (?, ?, ?, 1)", rows)
    conn.close()


def unlock_frame(board: int, lock: int) -> bytes:
    """02 ((b<<4)|n) 31 03 SUM (PROTOCOL section 10)."""
    head = bytes((0x02, (board << 4) | lock, 0x31, 0x03))
    return head + bytes((sum(head) & 0xFF,))


def open_port(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)
    return fd


def serve(args: argparse.Namespace) -> None:
    key = bytes.fromhex(args.code_key)
    prefix = (args.locker + "\n").encode("utf-8")
    wiring = {cid: unlock_frame(b, n) for cid, (b, n) in json.loads(args.wiring).items()}
    conn = connect(args.db)
    settle_wal(conn)
    keypad, board = open_port(args.keypad), open_port(args.kerong)
    print("ready", flush=True)
    typed = bytearray()
    while data := os.read(keypad, 256):
        for byte in data:
            if 0x30 <= byte <= 0x39:
                typed.append(byte)
                continue
            if byte == 0x2A:  # '*' clears
                typed.clear()
                continue
            if byte != 0x23:  # not '#'
                continue
            digest = hmac.new(key, prefix + bytes(typed), hashlib.sha256).hexdigest()
            typed.clear()
            row = conn.execute("SELECT id, compartment FROM codes WHERE digest = ?",
                               (digest,)).fetchone()
            if row is None:
                continue
            code_id, cid = row
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO events (event_id, type, at, compartment, code_id, data)"
                " VALUES (?, 'lock.pulse', ?, ?, ?, ?)",
                (str(uuid.uuid4()), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), cid,
                 code_id, '{"attempt": 1, "kind": "pickup", "source": "keypad"}'))
            conn.execute("COMMIT")
            os.write(board, wiring[cid])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keypad", required=True)
    parser.add_argument("--kerong", required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--code-key", required=True)
    parser.add_argument("--locker", required=True)
    parser.add_argument("--wiring", required=True, help='{"cid": [board, lock], ...}')
    try:
        serve(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
