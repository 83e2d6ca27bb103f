"""Snapshots in parts over MQTT: a signed manifest, its parts staged as they come, one swap."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt

from lockerd.apply.process import SILENCE_S, ApplyProcess, ApplyProcessFailed
from lockerd.apply.staging import manifest_doc
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.mqtt import Topics
from lockerd.services.cache import CodeCache
from lockerd.services.link import MqttLink
from lockerd.services.sync import payload_bytes
from lockerd.store.codes import CodeStore
from lockerd.store.events import EventLog
from lockerd.store.staging import SnapshotMeta
from lockerd.trust.dsse import parse_envelope
from lockerd.trust.parts import (
    CodesManifest,
    PartLimits,
    PartsProgress,
    check_header,
    parse_manifest_payload,
    read_header,
    verify_manifest,
)

log = get_logger("lockerd.parts")
T = TypeVar("T")
# The staging connection's page cache while filling: what a transfer adds to the daemon's
# memory is this, a few parts in flight and one part decoded (the 2x-idle target of a 1M set:
# with 16 MiB it was 2.02x, 1.96x with 12, and the fill no slower; docs/benchmarks.md).
PARTS_CACHE_KIB = 12288


class PartRefused(Exception):
    """A part that is not the one its manifest names: refused, the transfer goes on."""

    def __init__(self, error: TrustError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class PartsSettings:
    """[codes] limits and timings of snapshots in parts."""

    limits: PartLimits = field(default_factory=PartLimits)
    idle_s: float = 15.0
    timeout_s: float = 600.0


class StagingWorker:
    """The one thread that stages a snapshot in parts, through an apply process.

    The thread only waits on the pipe of an apply process (lockerd/apply/child.py), started
    when a transfer begins and ended with it, which checks each part against the manifest,
    decodes it and stages its entries through a database connection of its own: decoding
    a part holds that process's GIL, not the daemon's. The progress is kept in the thread,
    so a handler cancelled while it waits (the link dropped) never loses track of a part
    that was staged meanwhile.
    """

    def __init__(self, db_path: Path, *, silence_s: float = SILENCE_S) -> None:
        self._path = db_path
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lockerd-staging")
        self._process = ApplyProcess(db_path, silence_s=silence_s)
        self.progress: PartsProgress | None = None  # written only in the worker thread

    @property
    def process_pid(self) -> int | None:
        """The apply process's pid while a transfer is open (benchmarks read its memory)."""
        return self._process.pid

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args,
                                                                            **kwargs))

    def _ask(self, header: dict[str, Any], body: bytes = b"") -> dict[str, Any]:
        """(thread) One request; TrustError("apply_failed") when the process failed (it is
        ended: the next request starts another, whose first act is a `begin` or `discard`)."""
        try:
            reply = self._process.request(header, body)
        except ApplyProcessFailed as exc:
            self._process.close()
            raise TrustError(f"{exc}; the codes held stay in force",
                             reason="apply_failed") from exc
        if "failed" in reply:
            self._process.close()
            raise TrustError(f"the apply process failed: {reply['failed']}; the codes held "
                             "stay in force", reason="apply_failed")
        if (refused := reply.get("refused")) is not None:
            raise TrustError(refused["detail"], reason=refused["reason"])
        if "sqlite" in reply:
            raise sqlite3.OperationalError(reply["sqlite"])
        return reply

    def begin(self, manifest: CodesManifest) -> None:
        """(thread) Discard any staging left over and start `manifest`'s."""
        self.progress = None
        self._process.close()  # a process of an earlier transfer
        self._ask({"op": "begin", "manifest": manifest_doc(manifest),
                   "cache_kib": PARTS_CACHE_KIB})
        self.progress = PartsProgress(manifest)

    def stage(self, raw: bytes) -> int | None:
        """(thread) Check a part against the manifest and add its entries; its index, or None
        when it was staged already. PartRefused for a part that is not the manifest's;
        TrustError for a part that is but whose entries are refused (the set is broken), or
        when the apply process failed."""
        progress = self.progress
        if progress is None:
            return None
        try:
            header = check_header(raw, progress.manifest)
        except TrustError as exc:
            raise PartRefused(exc) from exc
        if header.index in progress.received:
            return None
        reply = self._ask({"op": "stage"}, raw)
        if (refused := reply.get("part_refused")) is not None:
            raise PartRefused(TrustError(refused["detail"], reason=refused["reason"]))
        progress.add(header.index, int(reply["entries"]))
        return header.index

    def swap(self, meta: SnapshotMeta, event: dict[str, Any], *, held: int) -> int:
        """(thread) Make the staged snapshot the live codes, with the `cache.updated` whose
        `at` and `data` are `event`; the number of codes after it. TrustError("rollback")
        when the codes held are no longer version `held` (a bundle was applied since the
        manifest was checked)."""
        try:
            reply = self._ask({"op": "swap", "version": meta.version,
                               "issued_at": meta.issued_at.isoformat(),
                               "expires_at": meta.expires_at.isoformat(),
                               "revoke": list(meta.revoke), "held": held, "event": event})
            return int(reply["swapped"])
        finally:
            self.progress = None
            self._process.close()

    def discard(self) -> None:
        """(thread) Drop what is staged."""
        self.progress = None
        try:
            self._ask({"op": "discard"})
        finally:
            self._process.close()

    def close(self) -> None:
        """End the apply process (waits for a call under way); safe to call again."""
        self._executor.submit(self._process.close).result()


class PartsService:
    """Receives snapshots in parts (docs/protocol.md, "Snapshots in parts").

    The manifest is verified like a snapshot bundle; each part is checked against it and its
    entries are staged beside the live codes, in the worker thread, as it arrives, in any
    order. Only when every part has been staged is the snapshot swapped in, with its
    `cache.updated`, in one short transaction. Every refusal is a `cache.rejected`.
    """

    def __init__(self, *, link: MqttLink, topics: Topics, locker_id: str, cache: CodeCache,
                 codes: CodeStore, events: EventLog, worker: StagingWorker, settings: PartsSettings,
                 now: Callable[[], datetime], monotonic: Callable[[], float],
                 applied: Callable[[], Awaitable[None]],
                 request_sync: Callable[[str], Awaitable[None]]) -> None:
        self._locker_id = locker_id
        self._cache = cache
        self._codes = codes
        self._events = events
        self._worker = worker
        self._settings = settings
        self._now = now
        self._monotonic = monotonic
        self._applied = applied
        self._request_sync = request_sync
        self._raw_manifest = b""
        self._last_progress = 0.0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        link.handle(topics.codes_manifest, self._on_manifest)
        link.handle(topics.codes_part, self._on_part)

    @property
    def progress(self) -> PartsProgress | None:
        return self._worker.progress

    @property
    def process_pid(self) -> int | None:
        """The apply process staging the open transfer, if one runs."""
        return self._worker.process_pid

    def wanted(self) -> dict[str, Any] | None:
        """What sync/request says of an open transfer: its version and the parts missing."""
        progress = self.progress
        if progress is None:
            return None
        return {"version": progress.manifest.version, "missing": progress.missing_runs()}

    async def run(self) -> None:
        """Ask again for the parts that do not come; give an idle transfer up. No timer
        runs while no transfer is open."""
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                while self.progress is not None:
                    try:
                        async with asyncio.timeout(self._settings.idle_s):
                            await self._changed.wait()
                        self._changed.clear()
                    except TimeoutError:
                        await self._idle()
        finally:
            self._worker.close()

    async def _idle(self) -> None:
        async with self._lock:
            progress = self.progress
            if progress is None:
                return
            if progress.complete:  # staged while its handler was cancelled
                await self._finish(progress)
            elif self._monotonic() - self._last_progress >= self._settings.timeout_s:
                await self._abandon(progress, TrustError(
                    f"codes manifest version {progress.manifest.version}: no part came for "
                    f"{self._settings.timeout_s:g} s ([codes] parts_timeout_s) with "
                    f"{len(progress.received)} of {progress.manifest.part_count} staged; "
                    "the codes held stay in force", reason="incomplete"))
            else:
                await self._request_sync("parts_missing")

    async def _staged(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A call of the staging thread, under the cache's apply lock: a snapshot bundle
        applied meanwhile would stage in the same table."""
        async with self._cache.apply_lock:
            return await self._worker.call(fn, *args, **kwargs)

    def _verify(self, raw: bytes) -> CodesManifest:
        keyring = self._cache.keyring
        if keyring is None:
            raise TrustError("no keyring is held yet: a codes manifest can only be verified "
                             "once a keyring has been loaded", reason="no_keyring")
        return verify_manifest(
            raw, codes_role=keyring.roles["codes"], keyring_expires_at=keyring.expires_at,
            locker_id=self._locker_id, held_version=self._codes.version(),
            now=self._now(), limits=self._settings.limits,
            floor_reset=self._codes.floor_reset_pending())

    async def _on_manifest(self, message: aiomqtt.Message) -> None:
        raw = payload_bytes(message)
        if not raw:
            return  # an empty retained message clears the manifest: nothing to do
        async with self._lock:
            progress = self.progress
            if progress is not None and raw == self._raw_manifest:
                # Delivered again (retained, at a reconnect, whose sync/request has named the
                # missing parts already; or published again): the transfer goes on.
                return
            try:
                manifest = self._verify(raw)
                if progress is not None and manifest.version <= progress.manifest.version:
                    raise TrustError(
                        f"codes manifest version {manifest.version} is not newer than "
                        f"version {progress.manifest.version}, whose parts are being "
                        "received; ignored", reason="rollback")
            except TrustError as exc:
                self._refuse_manifest(raw, exc)
                if exc.reason == "no_keyring":
                    await self._request_sync("no_keyring")
                return
            if progress is not None:
                log.info("codes manifest superseded by a newer one before all its parts came",
                         version=progress.manifest.version, newer=manifest.version)
            await self._begin(raw, manifest)

    async def _begin(self, raw: bytes, manifest: CodesManifest) -> None:
        try:
            await self._staged(self._worker.begin, manifest)
        except TrustError as exc:  # the apply process failed: nothing is staged
            self._cache.refuse("codes/manifest", exc.reason, str(exc), source="mqtt")
            return
        self._raw_manifest = raw
        self._last_progress = self._monotonic()
        self._changed.set()
        log.info("codes manifest accepted; receiving its parts", version=manifest.version,
                 parts=manifest.part_count, entries=manifest.entries)
        progress = self.progress
        if progress is not None and progress.complete:  # a snapshot of no codes
            await self._finish(progress)

    def _refuse_manifest(self, raw: bytes, exc: TrustError) -> None:
        if exc.reason == "rollback" and _manifest_version(raw) == self._codes.version():
            return  # the version held, delivered again (retained): quietly ignored
        self._cache.refuse("codes/manifest", exc.reason, str(exc), source="mqtt")

    async def _on_part(self, message: aiomqtt.Message) -> None:
        raw = payload_bytes(message)
        async with self._lock:
            progress = self.progress
            try:
                header = read_header(raw)
            except TrustError as exc:
                self._cache.refuse("codes/part", exc.reason, str(exc), source="mqtt")
                return
            if progress is None or header.version != progress.manifest.version:
                # A part of a transfer that is over (swapped, superseded): nothing to do.
                log.info("codes part of no open transfer; ignored", version=header.version,
                         index=header.index)
                return
            await self._stage(progress, raw)

    async def _stage(self, progress: PartsProgress, raw: bytes) -> None:
        try:
            index = await self._staged(self._worker.stage, raw)
        except PartRefused as exc:
            self._cache.refuse("codes/part", exc.error.reason, str(exc), source="mqtt")
            return
        except TrustError as exc:
            await self._abandon(progress, exc)
            return
        except sqlite3.Error as exc:
            await self._restart(progress, exc)
            return
        if index is None:
            return
        self._last_progress = self._monotonic()
        self._changed.set()
        if progress.complete:
            await self._finish(progress)

    async def _restart(self, progress: PartsProgress, exc: sqlite3.Error) -> None:
        """The staging table went from under the transfer (a snapshot bundle applied since
        uses the same table): begin again and ask for every part."""
        log.warning("staging failed; the snapshot in parts starts again",
                    version=progress.manifest.version, error=str(exc))
        try:
            self._verify(self._raw_manifest)
        except TrustError as refused:
            await self._abandon(progress, refused)
            return
        await self._begin(self._raw_manifest, progress.manifest)
        await self._request_sync("parts_missing")

    async def _abandon(self, progress: PartsProgress, exc: TrustError) -> None:
        """Refuse the whole transfer: what is staged is dropped, the codes held stay."""
        self._cache.refuse("codes/manifest", exc.reason, str(exc), source="mqtt")
        self._raw_manifest = b""
        try:
            await self._staged(self._worker.discard)
        except TrustError as failed:  # the next transfer's begin drops the staged rows
            log.warning("staged rows not dropped", error=str(failed))
        log.warning("snapshot in parts refused", version=progress.manifest.version,
                    reason=exc.reason)

    async def _finish(self, progress: PartsProgress) -> None:
        manifest = progress.manifest
        floor_reset = self._codes.floor_reset_pending()
        held = self._codes.version()
        try:
            if progress.entries != manifest.entries:
                raise TrustError(
                    f"codes manifest version {manifest.version} names {manifest.entries} "
                    f"entries, its parts hold {progress.entries}", reason="malformed")
            # Checked again: the keyring, the clock or the version held may have moved on.
            self._verify(self._raw_manifest)
        except TrustError as exc:
            await self._abandon(progress, exc)
            return
        data: dict[str, Any] = {"version": manifest.version, "base_version": None,
                                "upserted": manifest.entries, "revoked": len(manifest.revoke),
                                "parts": manifest.part_count, "source": "mqtt"}
        if floor_reset:
            data.update(floor_reset=True, previous_version=held)
        event = {"at": self._now().isoformat(), "data": data}
        meta = SnapshotMeta(version=manifest.version, issued_at=manifest.issued_at,
                            expires_at=manifest.expires_at, revoke=manifest.revoke)
        try:
            count = await self._staged(self._worker.swap, meta, event, held=held)
        except TrustError as exc:
            if exc.reason == "apply_failed" and self._codes.version() == manifest.version:
                # It failed after its swap committed, with the cache.updated in it.
                log.warning("apply process failed after its swap; the snapshot is applied",
                            version=manifest.version, error=str(exc))
                count = self._codes.count()
            else:
                await self._abandon(progress, exc)
                return
        except sqlite3.Error as exc:
            await self._restart(progress, exc)
            return
        self._raw_manifest = b""
        self._codes.forget_cached()
        self._events.notify()
        self._cache.observe_signed_time(manifest.issued_at)
        log.info("snapshot in parts applied", version=manifest.version,
                 parts=manifest.part_count, codes=count)
        await self._applied()


def _manifest_version(raw: bytes) -> int | None:
    try:
        return parse_manifest_payload(parse_envelope(raw).payload).version
    except TrustError:
        return None
