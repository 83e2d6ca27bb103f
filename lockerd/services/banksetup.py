"""A bank's database and code cache from its config, for the daemon and `lockerd import-*`."""

from __future__ import annotations

from lockerd.config import Config
from lockerd.services.cache import CodeCache
from lockerd.services.clock import Clock, TrustedClock
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.diskspace import MIB, record_keep_free
from lockerd.store.events import EventLog
from lockerd.trust.dsse import RoleKeys

# The bank's one database file, in [daemon] state_dir.
DB_NAME = "lockerd.db"


def open_bank_database(config: Config) -> Database:
    """The bank's database (made if need be), with what the config records in it for every
    process that uses the database: the disk a snapshot leaves free ([codes] keep_free_mb)."""
    db = open_database(config.state_dir / DB_NAME)
    record_keep_free(db, config.codes.keep_free_mb * MIB)
    return db


def build_cache(
    config: Config,
    *,
    db: Database,
    codes: CodeStore | None = None,
    events: EventLog | None = None,
    clock: Clock | None = None,
    trusted: TrustedClock | None = None,
) -> CodeCache:
    """The signed-update cache of a bank. This module imports nothing of the daemon's (the
    hal, MQTT, the other services): `lockerd import-bundle` builds its cache here too, and a
    third of such a process's start once went to importing lockerd.app."""
    trusted = trusted or TrustedClock(db=db, mode=config.time.trust_system_clock)
    return CodeCache(
        db=db, codes=codes or CodeStore(db), events=events or EventLog(db),
        locker_id=config.locker.id,
        pinned_root=RoleKeys.from_hex(config.trust.root_keys, config.trust.root_threshold),
        now=(clock or trusted).wall, monotonic=(clock or trusted).monotonic,
        observe_signed_time=trusted.observe_signed_time,
    )
