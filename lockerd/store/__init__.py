"""Local SQLite state of the daemon: events (the outbox), the code cache, and small settings."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lockerd.store.codes import CodeStore
    from lockerd.store.db import Database, open_database
    from lockerd.store.events import EventLog, StoredEvent

__all__ = ["CodeStore", "Database", "EventLog", "StoredEvent", "open_database"]

# Imported on first use (PEP 562): a process that needs only the database and the staging
# table (the apply process of a snapshot in parts) must not load the code store, whose
# bundle verification brings `cryptography` in.
_HOMES = {"CodeStore": "lockerd.store.codes", "Database": "lockerd.store.db",
          "open_database": "lockerd.store.db", "EventLog": "lockerd.store.events",
          "StoredEvent": "lockerd.store.events"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
