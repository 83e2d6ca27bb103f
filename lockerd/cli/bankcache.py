"""The bank's database and code cache for `lockerd import-keyring` / `import-bundle`, opened
without importing the daemon (lockerd.app and all it pulls in: the hal, MQTT, the services):
a third of such a process's start went to that import."""

from __future__ import annotations

from lockerd.config import Config
from lockerd.services.cache import CodeCache
from lockerd.services.clock import TrustedClock
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.diskspace import MIB, record_keep_free
from lockerd.store.events import EventLog
from lockerd.trust.dsse import RoleKeys

DB_NAME = "lockerd.db"
"""lockerd.app.DB_NAME (a test holds the two together)."""


def open_cache(config: Config) -> tuple[Database, CodeCache]:
    """The bank's database and its code cache, as lockerd.app.build_cache makes it with no
    clock given (a test holds the two together)."""
    db = open_database(config.state_dir / DB_NAME)
    # What the daemon records at its start, for a snapshot imported before it ever ran.
    record_keep_free(db, config.codes.keep_free_mb * MIB)
    trusted = TrustedClock(db=db, mode=config.time.trust_system_clock)
    cache = CodeCache(
        db=db, codes=CodeStore(db), events=EventLog(db), locker_id=config.locker.id,
        pinned_root=RoleKeys.from_hex(config.trust.root_keys, config.trust.root_threshold),
        now=trusted.wall, monotonic=trusted.monotonic,
        observe_signed_time=trusted.observe_signed_time,
    )
    return db, cache
