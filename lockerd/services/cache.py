"""Trust state and code cache updates: verify a keyring or codes bundle, apply it, event it."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lockerd import jsonsafe
from lockerd.apply.bundle import (
    BUNDLE_FILE_META,
    AppliedBundle,
    ApplyContext,
    envelope_version,
    no_keyring,
    verify_and_apply,
)
from lockerd.apply.bundlefile import verify_and_apply_envelope
from lockerd.apply.process import SILENCE_S, ApplyProcess, ApplyProcessFailed
from lockerd.core.events import EventType
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.services.rejections import RejectionRecorder
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.events import EventLog
from lockerd.trust.bundle import CodesBundle, read_envelope
from lockerd.trust.dsse import RoleKeys, parse_envelope
from lockerd.trust.keyring import Keyring, accept_keyring, load_stored_keyring

log = get_logger("lockerd.cache")

# A bundle (or bundle file) of this many bytes or more is verified and applied in an apply
# process: below it, its JSON decodes in a few milliseconds (about 900 codes), and a worker
# thread does it without the process start (docs/design.md, rule 9).
CHILD_MIN_BYTES = 256 << 10
OLDER_FILE_SKIPPED = "codes bundle file older than the codes held, as verified before; not read"
_HASH_CHUNK = 1 << 20
# "File with this stat has this SHA-256" (`CodeCache._file_digest`), and how long a file must
# have been left unmodified before it was hashed for that to be kept.
FILE_STAT_META = "codes_bundle_file_stat"
FILE_STAT_SETTLE_S = 2.0


class CodeCache:
    """Holds the trusted keyring and applies signed updates to the code store.

    Every refusal is logged and evented as `cache.rejected` with its reason, and changes
    nothing: the codes already held stay in force.
    """

    def __init__(
        self,
        *,
        db: Database,
        codes: CodeStore,
        events: EventLog,
        locker_id: str,
        pinned_root: RoleKeys,
        now: Callable[[], datetime],
        monotonic: Callable[[], float],
        observe_signed_time: Callable[[datetime], None] | None = None,
        rejected_per_minute: int = 20,
        child_min_bytes: int = CHILD_MIN_BYTES,
        apply_silence_s: float = SILENCE_S,
    ) -> None:
        self._db = db
        self._child_min_bytes = child_min_bytes
        self._silence_s = apply_silence_s
        self._process: ApplyProcess | None = None
        self.last_applied: AppliedBundle | None = None
        self._codes = codes
        self._events = events
        self._locker_id = locker_id
        self._pinned_root = pinned_root
        self._now = now
        self._observe_time = observe_signed_time or (lambda _: None)
        # A hostile or broken publisher must not fill the event log with rejections.
        self._rejections = RejectionRecorder(
            per_minute=rejected_per_minute, monotonic=monotonic,
            write=lambda type_, data: events.record(type=type_, at=now(), data=data))
        self.keyring: Keyring | None = self._load_stored_keyring()
        self._apply_lock = asyncio.Lock()

    def observe_signed_time(self, issued_at: datetime) -> None:
        """A document signed under this keyring (a technician token) was issued at
        `issued_at`: raise the trusted time floor as an accepted bundle does."""
        self._observe_time(issued_at)

    @property
    def apply_lock(self) -> asyncio.Lock:
        """Held while codes are staged or applied: one at a time, since a snapshot bundle and
        a snapshot in parts (services/parts.py) stage in the same table."""
        return self._apply_lock

    @property
    def keyring_version(self) -> int:
        return self.keyring.version if self.keyring else 0

    @property
    def codes_version(self) -> int:
        return self._codes.version()

    @property
    def trusted_root(self) -> RoleKeys:
        return self.keyring.roles["root"] if self.keyring else self._pinned_root

    def _load_stored_keyring(self) -> Keyring | None:
        stored = self._db.get_meta("keyring")
        if stored is None:
            return None
        # Re-verified against its own root: a database edited by hand is not trusted either.
        return load_stored_keyring(stored.encode("utf-8"))

    def load_keyring_file(self, path: Path) -> Keyring | None:
        """Load the keyring file named in the config, unless it is byte for byte the keyring
        held (verified when it was stored and again at every start): then None."""
        raw = path.read_bytes()
        stored = self._db.get_meta("keyring")
        if self.keyring is not None and stored is not None and stored.encode("utf-8") == raw:
            log.info("keyring file is the keyring held; not verified again", path=str(path),
                     version=self.keyring.version)
            return None
        return self.load_keyring(raw, source=str(path))

    def load_keyring(self, raw: bytes, *, source: str) -> Keyring:
        """Verify and store a keyring (durably, before anything is verified under it)."""
        try:
            keyring = accept_keyring(
                raw,
                trusted_root=self.trusted_root,
                current_version=self.keyring_version,
                now=self._now(),
            )
        except TrustError as exc:
            if not _is_repeat(exc, raw, self.keyring_version):
                self._reject("keyring", exc, source)
            raise
        # As in TUF, replacing the codes keys lifts the codes version floor: a bundle a stolen
        # codes key signed at the highest version would otherwise block every later one.
        # Another threshold alone is no rotation, nor is the first keyring.
        rotated = self.keyring is not None and keyring.codes.keyids != self.keyring.codes.keyids
        with self._db.transaction() as conn:
            self._db.set_meta("keyring", raw.decode("utf-8"), conn=conn)
            self._events.append(
                conn,
                type=EventType.KEYRING_UPDATED,
                at=self._now(),
                data={"version": keyring.version, "source": source},
            )
            if rotated:
                self._codes.reset_floor(conn, keyring_version=keyring.version)
                self._events.append(
                    conn,
                    type=EventType.CODES_FLOOR_RESET,
                    at=self._now(),
                    data={"keyring_version": keyring.version,
                          "codes_version": self._codes.version(), "source": source},
                )
        self._events.notify()
        self.keyring = keyring
        self._observe_time(keyring.issued_at)
        log.info("keyring accepted", version=keyring.version, source=source)
        if rotated:
            log.warning("codes keys replaced: the next full snapshot is accepted at any version",
                        keyring_version=keyring.version, codes_version=self._codes.version())
        return keyring

    @property
    def codes_floor_reset(self) -> bool:
        """True from a codes key rotation until the next full snapshot is applied."""
        return self._codes.floor_reset_pending()

    def load_bundle_file(self, path: Path) -> CodesBundle | None:
        """Apply the bundle file named in the config, unless it is the very file already applied.

        Unchanged means the same SHA-256 as the file last applied *and* the codes version that
        apply produced still held (and no codes floor reset pending): then nothing is parsed or
        verified and None is returned. So too for a file verified before and refused as a
        rollback, marked with its version: skipped while that version is below the one held.
        Anything else goes through `load_bundle` as before.
        Raises OSError when the file cannot be read, TrustError when it is refused.
        A blocking call: the daemon uses `load_bundle_file_off_loop`.
        """
        if self._file_unchanged(path, _file_sha256(path)):
            return None
        raw = path.read_bytes()
        # The hash of the bytes verified, not of the earlier pass: the file may have changed.
        file_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            return self.load_bundle(raw, source=str(path), file_sha256=file_sha256)
        except TrustError as exc:
            if exc.reason == "rollback":
                self._mark_verified_older(raw, file_sha256)
            raise

    async def load_bundle_file_off_loop(self, path: Path) -> AppliedBundle | None:
        """`load_bundle_file` off the event loop (safety rule 9): hashed in a worker thread;
        a file under `child_min_bytes` then read, verified and applied in that thread, a
        bigger one read, verified and applied by an apply process (the daemon never holds
        its bytes)."""
        digest, found_by = await self._file_digest(path)
        if self._file_unchanged(path, digest, found_by=found_by):
            return None

        def mark_older(version: int, file_sha256: str | None) -> None:
            if file_sha256 is not None:
                self._db.set_meta(BUNDLE_FILE_META,
                                  {"sha256": file_sha256, "version": version, "verified": True})

        if (await asyncio.to_thread(path.stat)).st_size >= self._child_min_bytes:
            return await self._apply_off_loop(b"", path, source=str(path), file_sha256=None,
                                              on_rollback=mark_older)
        raw = await asyncio.to_thread(path.read_bytes)
        # The hash of the bytes verified, not of the earlier pass: the file may have changed.
        file_sha256 = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())
        return await self._apply_off_loop(raw, None, source=str(path), file_sha256=file_sha256,
                                          on_rollback=mark_older)

    async def _file_digest(self, path: Path) -> tuple[str, str]:
        """The file's SHA-256 and how it was found ("hash" or "stat"): hashed in a worker
        thread, or the one kept for it when its stat (device, inode, size, modification and
        change times) is the one it had then: hashing a 1M-code file (290 MB) is most of a
        start's cost when it is unchanged. Kept only for a file last modified
        FILE_STAT_SETTLE_S before it was hashed, and whose stat did not change while it was:
        a file rewritten within its filesystem's time resolution could otherwise keep an old
        stat with new bytes."""
        before = await asyncio.to_thread(_stat_signature, path)
        kept = self._db.get_meta(FILE_STAT_META)
        if isinstance(kept, dict) and kept.get("stat") == before:
            known = kept.get("sha256")
            if isinstance(known, str):
                return known, "stat"
        digest = await asyncio.to_thread(_file_sha256, path)
        settled = time.time_ns() - before[3] > FILE_STAT_SETTLE_S * 1e9
        if settled and await asyncio.to_thread(_stat_signature, path) == before:
            self._db.set_meta(FILE_STAT_META, {"stat": before, "sha256": digest})
        return digest, "hash"

    def _file_unchanged(self, path: Path, digest: str, *, found_by: str = "hash") -> bool:
        mark = self._db.get_meta(BUNDLE_FILE_META)
        held = self._codes.version()
        if self._codes.floor_reset_pending() or not isinstance(mark, dict):
            return False
        if mark == {"sha256": digest, "version": held}:
            log.info("codes bundle file unchanged since it was applied; not read again",
                     path=str(path), version=held, sha256=digest,
                     sha256_from=found_by)
            return True
        # Verified once and refused as older than the codes held: while no floor reset
        # is pending the held version only grows, so it would be refused again.
        version = mark.get("version")
        if (mark.get("sha256") == digest and mark.get("verified") is True
                and isinstance(version, int) and version < held):
            log.info(OLDER_FILE_SKIPPED, path=str(path), version=version, held_version=held,
                     sha256=digest)
            return True
        return False

    def _mark_verified_older(self, raw: bytes, file_sha256: str) -> None:
        """Remember a bundle file refused as a rollback: `verify_bundle` only says rollback
        after the signature, the keyring's expiry and the locker id have passed, so the
        version read from its payload is a signed one."""
        version = envelope_version(raw)
        if version is not None:
            self._db.set_meta(BUNDLE_FILE_META,
                              {"sha256": file_sha256, "version": version, "verified": True})

    def load_bundle(self, raw: bytes, *, source: str,
                    file_sha256: str | None = None) -> CodesBundle:
        """Verify and apply a codes bundle; on any refusal the codes held stay in force.

        `file_sha256` (from `load_bundle_file`) is stored with the version applied, in the
        same transaction, so the next start can see the file is unchanged. A blocking call,
        on this cache's own database (`lockerd import-bundle`); the daemon uses
        `load_bundle_off_loop`."""
        held = self._codes.version()
        floor_reset = self._codes.floor_reset_pending()
        try:
            bundle = verify_and_apply(self._db, raw, context=self._context(held, floor_reset),
                                      source=source, now=self._now, file_sha256=file_sha256)
        except TrustError as exc:
            if not _is_repeat(exc, raw, held):
                self._reject("codes", exc, source)
            raise
        finally:
            self._codes.forget_cached()
        self._accepted(AppliedBundle.of(bundle), source)
        return bundle

    def load_bundle_path(self, path: Path, *, source: str) -> AppliedBundle:
        """`load_bundle` of the file at `path`, read here and held in memory as little as it
        can be (lockerd/apply/bundlefile.py: the file's bytes dropped once the payload is out,
        a snapshot staged a chunk of rows at a time). The same checks, refusals, events and
        outcome. A blocking call, for `lockerd import-bundle`. OSError when it cannot be read.
        """
        from lockerd.apply.bundlefile import BundleRefused, verify_and_apply_file

        held = self._codes.version()
        floor_reset = self._codes.floor_reset_pending()
        try:
            applied = verify_and_apply_file(self._db, path,
                                            context=self._context(held, floor_reset),
                                            source=source, now=self._now)
        except BundleRefused as exc:
            error = TrustError(str(exc), reason=exc.reason)
            # The very version held, delivered again: quietly ignored (_is_repeat).
            if not (exc.reason == "rollback" and exc.signed_version == held):
                self._reject("codes", error, source)
            raise error from None
        except TrustError as exc:  # no keyring held, or an envelope that is not one
            self._reject("codes", exc, source)
            raise
        finally:
            self._codes.forget_cached()
        self._accepted(applied, source)
        return applied

    def _context(self, held: int, floor_reset: bool) -> ApplyContext:
        keyring = self.keyring
        if keyring is None:
            raise no_keyring()
        return ApplyContext(codes_role=keyring.roles["codes"],
                            keyring_expires_at=keyring.expires_at, locker_id=self._locker_id,
                            held=held, floor_reset=floor_reset)

    @property
    def apply_process_pid(self) -> int | None:
        """The pid of the apply process while one runs (benchmarks read its memory)."""
        return None if self._process is None else self._process.pid

    async def load_bundle_off_loop(
        self, raw: bytes | bytearray, *, source: str, file_sha256: str | None = None,
        on_rollback: Callable[[int], None] | None = None,
    ) -> AppliedBundle:
        """`load_bundle` off the event loop, on a connection of its own: a bundle under
        `child_min_bytes` in a worker thread, a bigger one in an apply process (its JSON
        decoding would hold this process's GIL for tens of milliseconds). A snapshot is
        built beside the live codes in short transactions and swapped in by one short one,
        so neither the loop nor the daemon's writer waits for it. One apply at a time. A
        refusal as a rollback reads the signed version off the loop too (a big payload is
        never parsed on it), and gives it to `on_rollback`."""
        return await self._apply_off_loop(
            raw, None, source=source, file_sha256=file_sha256,
            on_rollback=None if on_rollback is None else lambda v, _: on_rollback(v))

    async def _apply_off_loop(
        self, raw: bytes | bytearray, path: Path | None, *, source: str, file_sha256: str | None,
        on_rollback: Callable[[int, str | None], None] | None,
    ) -> AppliedBundle:
        """The bundle `raw`, or (when `raw` is empty) the file at `path`, which only an
        apply process reads; the file's SHA-256 is then that process's."""
        async with self._apply_lock:
            held = self._codes.version()
            floor_reset = self._codes.floor_reset_pending()
            try:
                context = self._context(held, floor_reset)
                if path is not None or len(raw) >= self._child_min_bytes:
                    outcome = await self._in_process(raw, path, context, source=source,
                                                     file_sha256=file_sha256)
                else:
                    outcome = await asyncio.to_thread(
                        self._apply_in_worker, bytes(raw), context, source=source,
                        file_sha256=file_sha256)
            except TrustError as no_keys:
                outcome = _Refused(no_keys, None, file_sha256)
            finally:
                self._codes.forget_cached()
            if isinstance(outcome, _Refused):
                error, version = outcome.error, outcome.signed_version
                if error.reason == "rollback" and version is not None:
                    if on_rollback is not None:
                        on_rollback(version, outcome.file_sha256)
                    # The very version held, delivered again: quietly ignored (_is_repeat).
                    if version == held:
                        raise error
                self._reject("codes", error, source)
                raise error
            self._accepted(outcome, source)
            return outcome

    def _apply_in_worker(self, raw: bytes, context: ApplyContext, *, source: str,
                         file_sha256: str | None) -> AppliedBundle | _Refused:
        db = open_database(self._db.path)
        try:
            # As an apply process does it: a snapshot's entries straight to rows, a chunk at
            # a time, so this thread holds the GIL in slices of a chunk.
            return verify_and_apply_envelope(db, read_envelope(raw), context=context,
                                             source=source, now=self._now,
                                             file_sha256=file_sha256)
        except TrustError as exc:
            return _Refused(exc, envelope_version(raw) if exc.reason == "rollback" else None,
                            file_sha256)
        finally:
            db.close()

    async def _in_process(self, raw: bytes | bytearray, path: Path | None, context: ApplyContext, *,
                          source: str, file_sha256: str | None) -> AppliedBundle | _Refused:
        """Verify and apply in an apply process (lockerd/apply/child.py), awaited in a
        thread that only waits on its pipe. A process that dies or hangs leaves the codes
        held in force (unless it died after its swap) and is refused as `apply_failed`."""
        process = self._process = ApplyProcess(self._db.path, silence_s=self._silence_s)
        header = {"op": "bundle", "source": source, "now": self._now().isoformat(),
                  "context": _context_doc(context),
                  "file": None if path is None else str(path),
                  "hash_file": path is not None and file_sha256 is None}
        try:
            # Started in the thread too: a fork and exec is no work for the loop either.
            reply = await asyncio.to_thread(_ask, process, header, raw)
        except asyncio.CancelledError:
            process.kill()  # the daemon is stopping: the codes held stay, whole
            raise
        finally:
            self._process = None
        if isinstance(reply, ApplyProcessFailed):
            return self._after_failure(reply, context, source=source)
        return _outcome(reply, file_sha256, process.started_pid)

    def _after_failure(self, exc: ApplyProcessFailed, context: ApplyContext, *,
                       source: str) -> AppliedBundle | _Refused:
        version = self._codes.version()
        if version == context.held:
            return _Refused(TrustError(
                f"{exc}; the codes held (version {version}) stay in force", reason="apply_failed"),
                None, None)
        # It died after its swap committed (its cache.updated is in that transaction).
        log.warning("apply process failed after its swap; the codes are applied",
                    source=source, version=version, error=str(exc))
        issued = self._db.get_meta("codes_issued_at")
        return AppliedBundle(version=version, base_version=None, upserted=self._codes.count(),
                             issued_at=datetime.fromtimestamp(int(issued or 0), UTC), revoked=0)

    def _accepted(self, bundle: AppliedBundle, source: str) -> None:
        self.last_applied = bundle
        self._observe_time(bundle.issued_at)
        self._events.notify()
        log.info("codes bundle applied", version=bundle.version, base_version=bundle.base_version,
                 upserted=bundle.upserted, revoked=bundle.revoked, source=source,
                 apply_process=bundle.pid)

    def refuse(self, what: str, reason: str, detail: str, *, source: str) -> None:
        """Record a refusal decided before verification (e.g. a payload over the size limit)."""
        self._reject(what, TrustError(detail, reason=reason), source)

    def _reject(self, what: str, exc: TrustError, source: str) -> None:
        data: dict[str, Any] = {"what": what, "reason": exc.reason, "detail": str(exc),
                                "source": source}
        log.warning("signed update refused", **data)
        self._rejections.record(EventType.CACHE_REJECTED, data)



@dataclass(frozen=True, slots=True)
class _Refused:
    """A bundle refused off the loop, with the version its payload names (for a rollback)
    and, for a bundle file, the SHA-256 of the bytes verified."""

    error: TrustError
    signed_version: int | None
    file_sha256: str | None


def _ask(process: ApplyProcess, header: dict[str, Any],
         body: bytes | bytearray) -> dict[str, Any] | ApplyProcessFailed:
    """(thread) One request to a fresh apply process, which then ends."""
    try:
        return process.request(header, body)
    except ApplyProcessFailed as exc:
        return exc
    finally:
        process.close()


def _context_doc(context: ApplyContext) -> dict[str, Any]:
    role = context.codes_role
    return {"codes_keys": [key.public_bytes_raw().hex() for key in role.keys.values()],
            "codes_threshold": role.threshold,
            "keyring_expires_at": context.keyring_expires_at.isoformat(),
            "locker_id": context.locker_id, "held": context.held,
            "floor_reset": context.floor_reset}


def _outcome(reply: dict[str, Any], file_sha256: str | None,
             pid: int | None) -> AppliedBundle | _Refused:
    """An apply process's final reply as an outcome."""
    if (applied := reply.get("applied")) is not None:
        return AppliedBundle(version=applied["version"], base_version=applied["base_version"],
                             issued_at=datetime.fromisoformat(applied["issued_at"]),
                             upserted=applied["upserted"], revoked=applied["revoked"], pid=pid)
    if (refused := reply.get("refused")) is not None:
        return _Refused(TrustError(refused["detail"], reason=refused["reason"]),
                        refused["signed_version"], refused["file_sha256"] or file_sha256)
    detail = reply.get("failed", reply)
    return _Refused(TrustError(f"the apply process failed: {detail}; the codes held stay in "
                               "force", reason="apply_failed"), None, None)


def _stat_signature(path: Path) -> list[int]:
    """What changes when a file is replaced or written: device, inode, size, mtime, ctime."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file read in chunks: memory stays bounded however big the bundle is."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_repeat(exc: TrustError, raw: bytes, held_version: int) -> bool:
    """The very version already held, delivered again (a retained message, a config file read at
    every start): ignored quietly rather than evented as an attack. An older version is not."""
    if exc.reason != "rollback":
        return False
    try:
        version = jsonsafe.loads(parse_envelope(raw).payload).get("version")
    except (TrustError, jsonsafe.JsonInputError, AttributeError):
        return False
    return bool(version == held_version)
