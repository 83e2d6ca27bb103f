"""A codes bundle file verified and applied with as little of it in memory at once as it can.

`verify_and_apply` (lockerd/apply/bundle.py) holds the file, its envelope, the payload, every
entry parsed and a CodeEntry per code at the same time: 1.2 GiB for a 1M-code snapshot. Here
the file's bytes are dropped once the payload is out of them, and a snapshot's entries go to
the staging table a chunk of rows at a time (lockerd.trust.bundle.SnapshotRows). The checks,
their order and every refusal are verify_bundle's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import msgspec

from lockerd.apply.bundle import AppliedBundle, ApplyContext, updated_event
from lockerd.errors import TrustError
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database
from lockerd.store.staging import CodeStaging, SnapshotMeta
from lockerd.trust.bundle import (
    SnapshotRows,
    parse_bundle_payload,
    read_envelope,
    verify_snapshot_rows,
)
from lockerd.trust.dsse import Envelope


class _Version(msgspec.Struct):
    version: object = None


class BundleRefused(TrustError):
    """A refusal, with the version the payload claims (signed when the reason is rollback:
    that is only decided once the signature verified), or None when none could be read."""

    def __init__(self, error: TrustError, signed_version: int | None) -> None:
        super().__init__(str(error), reason=error.reason)
        self.signed_version = signed_version


def verify_and_apply_file(db: Database, path: Path, *, context: ApplyContext, source: str,
                          now: Callable[[], datetime], file_sha256: str | None = None,
                          on_rows: Callable[[int], object] | None = None) -> AppliedBundle:
    """Read, verify and apply the bundle file at `path` through `db`, with its `cache.updated`
    (and the file's mark, with `file_sha256`) in the swap's transaction. OSError when it
    cannot be read; BundleRefused when it is refused: nothing is changed then."""
    # The file's bytes go once the payload is out of them.
    return verify_and_apply_envelope(db, read_envelope(path.read_bytes()), context=context,
                                     source=source, now=now, file_sha256=file_sha256,
                                     on_rows=on_rows)


def verify_and_apply_envelope(db: Database, env: Envelope, *, context: ApplyContext,
                              source: str, now: Callable[[], datetime],
                              file_sha256: str | None = None,
                              on_rows: Callable[[int], object] | None = None) -> AppliedBundle:
    """`verify_and_apply_file` of a bundle already read (`read_envelope`): a file's, or one
    received over MQTT and handed to an apply process. A snapshot's entries go straight to
    rows, a chunk at a time, never to a CodeEntry each (about 10 us a code)."""
    try:
        verified = verify_snapshot_rows(
            env, codes_role=context.codes_role, keyring_expires_at=context.keyring_expires_at,
            locker_id=context.locker_id, held_version=context.held, now=now(),
            floor_reset=context.floor_reset)
    except TrustError as exc:
        raise BundleRefused(exc, _version(env.payload) if exc.reason == "rollback"
                            else None) from exc
    del env
    if isinstance(verified, SnapshotRows):
        applied = AppliedBundle(version=verified.version, base_version=None,
                                issued_at=verified.issued_at, upserted=verified.count,
                                revoked=len(verified.revoke))
    else:
        applied = AppliedBundle.of(verified)
    with_event = updated_event(db, applied, context=context, source=source, now=now,
                               file_sha256=file_sha256)

    try:
        if isinstance(verified, SnapshotRows):
            stage_snapshot(db, verified, with_event=with_event, on_rows=on_rows)
        else:
            CodeStore(db).apply(verified, with_event=with_event, on_rows=on_rows)
    except TrustError as exc:
        raise BundleRefused(exc, None) from exc
    return applied


def stage_snapshot(db: Database, rows: SnapshotRows, *,
                   with_event: Callable[[sqlite3.Connection], object] | None = None,
                   on_rows: Callable[[int], object] | None = None) -> int:
    """Stage the snapshot's rows chunk by chunk and swap them in (`CodeStaging`); the codes
    held after it. A refusal (a bad entry, an id or digest given twice) discards what was
    staged and is the one `CodeStore.apply` of the parsed bundle would make."""
    staging = CodeStaging(db, on_rows=on_rows)
    staging.begin(rows.version, rows=rows.count)
    try:
        for chunk in rows.chunks():
            try:
                staging.add_rows(chunk)
            except TrustError as exc:
                if exc.reason != "malformed":  # no room: not the payload's fault
                    raise
                raise _first_fault(rows, exc) from exc
            del chunk
        return staging.swap(SnapshotMeta(version=rows.version, issued_at=rows.issued_at,
                                         expires_at=rows.expires_at, revoke=rows.revoke),
                            with_event=with_event)
    except BaseException:
        staging.discard()
        raise


def _first_fault(rows: SnapshotRows, staged: TrustError) -> TrustError:
    """The staging table refused a row (an id or a digest given twice). An id twice, or a
    fault in a later entry, is refused by the parser before anything is staged: its refusal
    comes first; only a digest twice in a payload it takes is the staging table's."""
    try:
        parse_bundle_payload(rows.payload)
    except TrustError as exc:
        return exc
    return staged


def _version(payload: bytes) -> int | None:
    try:
        version = msgspec.json.decode(payload, type=_Version).version
    except (msgspec.MsgspecError, RecursionError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
