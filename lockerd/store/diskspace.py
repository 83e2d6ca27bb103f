"""The disk a staged snapshot leaves free for the events, and its refusal when it would not."""

from __future__ import annotations

import os
from pathlib import Path

from lockerd.errors import TrustError
from lockerd.store.db import Database

# [codes] keep_free_mb, as the daemon and `lockerd import-bundle` found it in their config:
# recorded in the database, where every process that stages a snapshot (the apply process,
# a worker thread, the import) reads it without being handed the config.
KEEP_FREE_META = "codes_keep_free_bytes"
KEEP_FREE_DEFAULT = 64 * 1024 * 1024
MIB = 1024 * 1024
# What a staged code takes on the disk, twice over until the swap: once in the side file,
# once in the staging tables the side file is copied into (about 330 bytes a code with a
# parcel, measured at 100 000 codes; a little more allowed for longer ids).
ROW_BYTES = 400


def record_keep_free(db: Database, keep_free_bytes: int) -> None:
    """Record the configured reserve, when it is not the one recorded already."""
    if db.get_meta(KEEP_FREE_META) != keep_free_bytes:
        db.set_meta(KEEP_FREE_META, keep_free_bytes)


def keep_free_of(db: Database) -> int:
    value = db.get_meta(KEEP_FREE_META)
    return value if isinstance(value, int) and value >= 0 else KEEP_FREE_DEFAULT


def free_bytes(directory: Path) -> int:
    """The bytes an unprivileged process may still write on `directory`'s filesystem."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def ensure_room(db: Database, need_bytes: int, *, version: int, keep_free_bytes: int) -> None:
    """TrustError(reason="no_space") unless `need_bytes` more can be written next to the
    database and still leave `keep_free_bytes` free: a snapshot must not take the disk the
    daemon's events (a pickup's commit) need."""
    directory = db.path.parent
    free = free_bytes(directory)
    if free - need_bytes >= keep_free_bytes:
        return
    raise TrustError(
        f"codes bundle version {version} needs about {_mib(need_bytes)} MiB more disk in "
        f"{directory}, which has {_mib(free)} MiB free, and {_mib(keep_free_bytes)} MiB are "
        "kept free for the events ([codes] keep_free_mb): free space on that filesystem, "
        "or send a smaller set", reason="no_space")


def _mib(n: int) -> str:
    return f"{n / MIB:.0f}" if n >= 10 * MIB else f"{n / MIB:.1f}"
