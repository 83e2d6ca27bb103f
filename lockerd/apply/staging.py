"""The apply process's side of a snapshot in parts: each part checked, decoded and staged."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from lockerd.core.events import EventType
from lockerd.errors import TrustError
from lockerd.store.db import Database
from lockerd.store.events import EventLog
from lockerd.store.staging import CodeStaging, SnapshotMeta
from lockerd.trust.partwire import CodesManifest, PartRef, check_part, part_rows

Reply = Callable[[dict[str, Any]], None]


def manifest_doc(manifest: CodesManifest) -> dict[str, Any]:
    """A verified manifest as the apply process is given it (it checks no signature)."""
    return {"locker_id": manifest.locker_id, "version": manifest.version,
            "issued_at": manifest.issued_at.isoformat(),
            "expires_at": manifest.expires_at.isoformat(), "revoke": list(manifest.revoke),
            "entries": manifest.entries, "parts": [[p.sha256, p.size] for p in manifest.parts]}


def manifest_of(doc: dict[str, Any]) -> CodesManifest:
    return CodesManifest(
        locker_id=doc["locker_id"], version=doc["version"],
        issued_at=datetime.fromisoformat(doc["issued_at"]),
        expires_at=datetime.fromisoformat(doc["expires_at"]), revoke=tuple(doc["revoke"]),
        entries=doc["entries"], parts=tuple(PartRef(sha256=s, size=n) for s, n in doc["parts"]))


def held_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'codes_version'").fetchone()
    return int(row[0]) if row else 0


class PartsStager:
    """Requests begin, stage, swap and discard, each answered with one reply."""

    def __init__(self, db: Database, reply: Reply) -> None:
        self._db = db
        self._reply = reply
        self._staging: CodeStaging | None = None
        self._manifest: CodesManifest | None = None

    def handle(self, header: dict[str, Any], body: bytes) -> None:
        op = header["op"]
        if op == "begin":
            self._manifest = manifest_of(header["manifest"])
            self._staging = CodeStaging(self._db, cache_kib=header["cache_kib"])
            try:
                self._staging.begin(self._manifest.version, rows=self._manifest.entries)
            except TrustError as exc:  # no room for it: nothing was staged
                self._manifest = self._staging = None
                self._reply({"refused": {"reason": exc.reason, "detail": str(exc)}})
                return
            self._reply({"begun": self._manifest.version})
        elif op == "stage":
            self._stage(body)
        elif op == "swap":
            self._swap(header)
        elif op == "discard":
            self._manifest = None
            CodeStaging(self._db).discard()
            self._reply({"discarded": True})
        else:
            raise ValueError(f"unknown request {op!r}")

    def _stage(self, raw: bytes) -> None:
        manifest, staging = self._manifest, self._staging
        if manifest is None or staging is None:
            raise RuntimeError("a part staged before any manifest was begun")
        try:
            header = check_part(raw, manifest)
        except TrustError as exc:
            self._reply({"part_refused": {"reason": exc.reason, "detail": str(exc)}})
            return
        try:
            # Rows, not entries: no object per code but its row. In digest order: the side
            # file's codes table is keyed by digest, and an add of neighbouring keys touches
            # fewer of its pages (store/staging.py).
            rows = part_rows(raw, revoke=manifest.revoke, by_digest=True)
            staging.add_rows(rows)
        except TrustError as exc:
            self._reply({"refused": {"reason": exc.reason, "detail": str(exc)}})
            return
        except sqlite3.Error as exc:
            self._reply({"sqlite": str(exc)})
            return
        self._reply({"staged": header.index, "entries": len(rows)})

    def _swap(self, header: dict[str, Any]) -> None:
        staging = self._staging
        if staging is None:
            raise RuntimeError("a swap before any manifest was begun")
        held = header["held"]
        meta = SnapshotMeta(version=header["version"],
                            issued_at=datetime.fromisoformat(header["issued_at"]),
                            expires_at=datetime.fromisoformat(header["expires_at"]),
                            revoke=tuple(header["revoke"]))
        event = header["event"]
        events = EventLog(self._db)

        def with_event(conn: sqlite3.Connection) -> None:
            events.append(conn, type=EventType.CACHE_UPDATED,
                          at=datetime.fromisoformat(event["at"]), data=event["data"])

        self._manifest = None
        try:
            if (now_held := held_version(self._db.conn)) != held:
                raise TrustError(f"the codes held went from version {held} to {now_held} "
                                 "before the swap", reason="rollback")
            count = staging.swap(meta, with_event=with_event)
        except TrustError as exc:
            self._reply({"refused": {"reason": exc.reason, "detail": str(exc)}})
            return
        except sqlite3.Error as exc:
            self._reply({"sqlite": str(exc)})
            return
        self._reply({"swapped": count})
