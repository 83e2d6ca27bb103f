"""How the UI reaches a bank: the simulator's control socket, its events, and (when the
daemon runs in this process) a few of the daemon's own views."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lockerd.dev.ui.feed import EventFeed
from lockerd.dev.ui.model import Snapshot, snapshot_of
from sim.client import SimClient

Say = Callable[[str], Awaitable[None]]


@dataclass
class DaemonHooks:
    """What only a daemon in this process offers: each is None when it does not apply."""

    # The display's text, when the world behind the control socket is not the display's
    # (a wire-level bank: only the display stays simulated in the daemon).
    display: Callable[[], str] | None = None
    # compartment id -> in service, as the daemon sees it.
    service: Callable[[], Mapping[str, bool]] | None = None
    # compartment id -> size label, from the daemon's configuration.
    sizes: Callable[[], Mapping[str, str | None]] | None = None
    # Put a compartment back into service (after a jam); True when it changed.
    put_in_service: Callable[[str], Awaitable[bool]] | None = None
    # The codes a person may type here, one line each.
    codes: Callable[[], list[str]] | None = None
    # A signed pickup QR token for a compartment.
    qr_token: Callable[[str], str] | None = None
    # The guided tour: calls say(text) before each step; False if a step failed.
    tour: Callable[[Say], Awaitable[bool]] | None = None


@dataclass
class BankLink:
    """A running bank as the UI drives it."""

    title: str
    control: SimClient
    feed: EventFeed
    hooks: DaemonHooks = field(default_factory=DaemonHooks)

    @classmethod
    def attach(cls, *, socket: Path, db: Path) -> BankLink:
        """A daemon running elsewhere, with its `[backends.sim] socket` and its database."""
        return cls(title=f"bank at {socket}", control=SimClient(socket), feed=EventFeed(db))

    async def snapshot(self) -> Snapshot:
        state = await self.control.state()
        hooks = self.hooks
        return snapshot_of(state, display=hooks.display() if hooks.display else None,
                           service=hooks.service() if hooks.service else None,
                           sizes=hooks.sizes() if hooks.sizes else None)

    async def close(self) -> None:
        await self.control.close()
        self.feed.close()
