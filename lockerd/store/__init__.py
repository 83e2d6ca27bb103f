"""Local SQLite state of the daemon: events (the outbox), the code cache, and small settings."""

from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.events import EventLog, StoredEvent

__all__ = ["CodeStore", "Database", "EventLog", "StoredEvent", "open_database"]
