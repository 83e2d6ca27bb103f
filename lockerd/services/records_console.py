"""The console's view of what the bank holds: the codes cache (`codes`) and the event log
(`events`, `log`)."""

from __future__ import annotations

import json
from typing import TypeVar

from lockerd.core.console import Args, Caller, Level, Registry, Reply
from lockerd.services.cache import CodeCache
from lockerd.store.codes import CodeStore
from lockerd.store.events import EventLog
from lockerd.timeutil import format_time

C = TypeVar("C", bound=Caller)


def register_codes_commands(registry: Registry[C], *, codes: CodeStore,
                            cache: CodeCache) -> None:
    """`codes`: the cache's version, size and expiry; never a code."""

    async def codes_status(s: Caller, a: Args) -> Reply:
        expires = codes.expires_at()
        data = {"version": codes.version(), "count": codes.count(),
                "expires_at": format_time(expires) if expires else None,
                "keyring_version": cache.keyring_version}
        text = [f"codes cache v{data['version']}: {data['count']} codes, expires "
                f"{data['expires_at'] or 'never (no bundle)'}",
                f"keyring v{data['keyring_version']}"]
        return Reply(text, data)

    registry.register_command("codes", codes_status, "code cache version, count, expiry",
                              level=Level.VIEWER)


def register_event_commands(registry: Registry[C], *, events: EventLog, locker_id: str) -> None:
    """`events` and `log` (lockerd keeps no log buffer: `log` shows events and says so)."""

    def event_rows(n: int) -> Reply:
        recent = events.recent(n)
        text = [f"{e.seq:>6} {e.at} {e.type} {e.compartment or ''} "
                + json.dumps(dict(e.data), separators=(",", ":")) for e in recent]
        return Reply(text or ["no events"], {"events": [e.wire(locker_id) for e in recent]})

    async def events_cmd(s: Caller, a: Args) -> Reply:
        return event_rows(a.int_at(0, default=10, lo=1, hi=200, what="N"))

    async def log_cmd(s: Caller, a: Args) -> Reply:
        reply = event_rows(a.int_at(0, default=20, lo=1, hi=200, what="N"))
        note = "lockerd keeps no log buffer (logs go to the journal); recent events instead:"
        return Reply([note, *reply.text], {"note": note, **reply.data})

    V = Level.VIEWER
    registry.register_command("events", events_cmd, "the last N events", level=V,
                              usage="events [N]")
    registry.register_command("log", log_cmd, "the last N log entries", level=V,
                              usage="log [N]")
