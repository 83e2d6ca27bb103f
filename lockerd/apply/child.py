"""The apply process: `python -m lockerd.apply.child DB PID` verifies, decodes and stages codes.

It reads request frames on stdin and answers with JSON lines on stdout (lockerd/apply/
frames.py), working on the bank's database through a connection of its own. A bundle is
verified and applied whole, its `cache.updated` in the swap's transaction; a snapshot in
parts is begun, staged part by part and swapped, its event in the swap. Its own GIL: the
daemon's event loop shares none of this work. It exits when stdin closes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lockerd.apply.frames import encode_reply, read_request
from lockerd.apply.staging import PartsStager
from lockerd.errors import TrustError
from lockerd.store.db import Database, open_database

if TYPE_CHECKING:
    from lockerd.apply.bundle import AppliedBundle, ApplyContext

# A bundle's verification (lockerd.apply.bundle, its Ed25519 and msgspec) is imported by
# the first bundle request: a process that only stages parts never loads it, which keeps
# its start and its memory small (the manifest was verified by the daemon).

Reply = Callable[[dict[str, Any]], None]
_PR_SET_PDEATHSIG = 1


def context_of(header: dict[str, Any]) -> ApplyContext:
    from lockerd.apply.bundle import ApplyContext
    from lockerd.trust.dsse import RoleKeys

    ctx = header["context"]
    return ApplyContext(
        codes_role=RoleKeys.from_hex(ctx["codes_keys"], ctx["codes_threshold"]),
        keyring_expires_at=datetime.fromisoformat(ctx["keyring_expires_at"]),
        locker_id=ctx["locker_id"], held=ctx["held"], floor_reset=ctx["floor_reset"])


def clock_from(now_text: str) -> Callable[[], datetime]:
    """The daemon's trusted time when it asked, moved on by this process's monotonic clock."""
    start, t0 = datetime.fromisoformat(now_text), time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - t0)


def applied_reply(applied: AppliedBundle) -> dict[str, Any]:
    """The final reply of an applied bundle (lockerd/apply/process.py reads it back)."""
    return {"applied": {"version": applied.version, "base_version": applied.base_version,
                        "issued_at": applied.issued_at.isoformat(),
                        "upserted": applied.upserted, "revoked": applied.revoked}}


def apply_bundle_file(db: Database, header: dict[str, Any], reply: Reply) -> None:
    """A bundle file (`[codes] bundle_file` at start): read by this process, a snapshot's
    entries decoded a chunk of rows at a time (lockerd/apply/bundlefile.py), so that its
    memory holds the file's payload and one chunk, not an object per code."""
    from lockerd.apply.bundlefile import BundleRefused, verify_and_apply_file

    path = Path(header["file"])
    file_sha256 = None
    if header.get("hash_file"):
        with path.open("rb") as f:
            file_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    reply({"progress": "read", "bytes": path.stat().st_size})
    try:
        applied = verify_and_apply_file(
            db, path, context=context_of(header), source=header["source"],
            now=clock_from(header["now"]), file_sha256=file_sha256,
            on_rows=lambda n: reply({"progress": "staged", "rows": n}))
    except BundleRefused as exc:
        reply({"refused": {"reason": exc.reason, "detail": str(exc), "file_sha256": file_sha256,
                           "signed_version": exc.signed_version}})
        return
    reply(applied_reply(applied))


def apply_bundle(db: Database, header: dict[str, Any], body: bytes, reply: Reply) -> None:
    """A bundle sent whole (over MQTT, or a bundle file's bytes): verified and applied as a
    bundle file is, a snapshot's entries straight to rows (lockerd/apply/bundlefile.py)."""
    from lockerd.apply.bundle import envelope_version
    from lockerd.apply.bundlefile import verify_and_apply_envelope
    from lockerd.trust.bundle import read_envelope

    if header.get("file") is not None:
        apply_bundle_file(db, header, reply)
        return
    file_sha256 = hashlib.sha256(body).hexdigest() if header.get("hash_file") else None
    reply({"progress": "read", "bytes": len(body)})
    try:
        applied = verify_and_apply_envelope(
            db, read_envelope(body), context=context_of(header), source=header["source"],
            now=clock_from(header["now"]), file_sha256=file_sha256,
            on_rows=lambda n: reply({"progress": "staged", "rows": n}))
    except TrustError as exc:
        reply({"refused": {"reason": exc.reason, "detail": str(exc), "file_sha256": file_sha256,
                           "signed_version": (envelope_version(body)
                                              if exc.reason == "rollback" else None)}})
        return
    reply(applied_reply(applied))


def serve(db_path: Path, requests: BinaryIO, out: BinaryIO) -> None:
    def reply(message: dict[str, Any]) -> None:
        out.write(encode_reply(message))
        out.flush()

    db = open_database(db_path)
    stager = PartsStager(db, reply)
    try:
        while (request := read_request(requests)) is not None:
            header, body = request
            try:
                if header["op"] == "bundle":
                    apply_bundle(db, header, body, reply)
                else:
                    stager.handle(header, body)
            except Exception as exc:  # reported, then this process ends: the daemon decides
                reply({"failed": f"{type(exc).__name__}: {exc}"})
                raise
    finally:
        db.close()


def die_with_parent(parent: int) -> None:
    """Be killed by the kernel when the daemon's thread that started this process ends (the
    daemon killed -9 too): an orphan must not go on staging beside a restarted daemon, which
    stages in the same table. Linux only; elsewhere the closed pipe ends it at its next read."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl took hold
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m lockerd.apply.child DATABASE PARENT_PID (run by lockerd, not "
              "by hand)", file=sys.stderr)
        return 2
    die_with_parent(int(args[1]))
    # The replies keep the real stdout; anything printed by mistake goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(Path(args[0]), sys.stdin.buffer, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
