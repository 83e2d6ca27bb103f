"""Verify a codes bundle and apply it through one connection: the work of a thread or a child."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lockerd import jsonsafe
from lockerd.core.events import EventType
from lockerd.errors import TrustError
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database
from lockerd.store.events import EventLog
from lockerd.trust.bundle import CodesBundle, verify_bundle
from lockerd.trust.dsse import RoleKeys, parse_envelope

# The SHA-256 of the bundle file last applied and the codes version it produced, written in
# the transaction of that apply, so the mark never outlives (or predates) the codes it names.
# A file refused as a rollback is marked {sha256, version, verified: true} instead.
BUNDLE_FILE_META = "codes_bundle_file"


@dataclass(frozen=True, slots=True)
class ApplyContext:
    """What verifying a bundle needs of the daemon, read before it starts (plain values, so
    a child process is given the same): the codes keys, the keyring's expiry, the locker,
    the version held and whether its floor was reset."""

    codes_role: RoleKeys
    keyring_expires_at: datetime
    locker_id: str
    held: int
    floor_reset: bool


@dataclass(frozen=True, slots=True)
class AppliedBundle:
    """What an applied bundle was, without its codes (a child reports it over a pipe)."""

    version: int
    base_version: int | None
    issued_at: datetime
    upserted: int
    revoked: int
    pid: int | None = None
    """The apply process that applied it; None when a thread of the daemon did."""

    @classmethod
    def of(cls, bundle: CodesBundle) -> AppliedBundle:
        return cls(version=bundle.version, base_version=bundle.base_version,
                   issued_at=bundle.issued_at, upserted=len(bundle.upsert),
                   revoked=len(bundle.revoke))


def verify_and_apply(db: Database, raw: bytes, *, context: ApplyContext, source: str,
                     now: Callable[[], datetime], file_sha256: str | None = None,
                     on_rows: Callable[[int], object] | None = None) -> CodesBundle:
    """Verify `raw` and apply it through `db` (this thread's connection), with its
    `cache.updated` and the bundle file's mark in the apply's last transaction.
    TrustError for a refusal: nothing is changed then."""
    bundle = verify_bundle(
        raw, codes_role=context.codes_role, keyring_expires_at=context.keyring_expires_at,
        locker_id=context.locker_id, held_version=context.held, now=now(),
        floor_reset=context.floor_reset)
    with_event = updated_event(db, AppliedBundle.of(bundle), context=context, source=source,
                               now=now, file_sha256=file_sha256)
    # The codes and the event that reports them in one transaction, like the keyring.
    CodeStore(db).apply(bundle, with_event=with_event, on_rows=on_rows)
    return bundle


def updated_event(db: Database, applied: AppliedBundle, *, context: ApplyContext, source: str,
                  now: Callable[[], datetime],
                  file_sha256: str | None) -> Callable[[sqlite3.Connection], None]:
    """What an apply writes in its last transaction: the `cache.updated` that reports it, and
    the bundle file's mark when it came from one (`file_sha256`)."""
    data: dict[str, Any] = {"version": applied.version, "base_version": applied.base_version,
                            "upserted": applied.upserted, "revoked": applied.revoked,
                            "source": source}
    if context.floor_reset:
        data.update(floor_reset=True, previous_version=context.held)
    events = EventLog(db)

    def with_event(conn: sqlite3.Connection) -> None:
        events.append(conn, type=EventType.CACHE_UPDATED, at=now(), data=data)
        if file_sha256 is not None:
            db.set_meta(BUNDLE_FILE_META, {"sha256": file_sha256, "version": applied.version},
                        conn=conn)

    return with_event


def no_keyring() -> TrustError:
    return TrustError(
        "no keyring is held yet: a codes bundle can only be verified once a keyring "
        "signed by the pinned root keys has been loaded",
        reason="no_keyring",
    )


def envelope_version(raw: bytes) -> int | None:
    """The `version` in an envelope's payload, or None when there is none to read."""
    try:
        version = jsonsafe.loads(parse_envelope(raw).payload).get("version")
    except (TrustError, jsonsafe.JsonInputError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
