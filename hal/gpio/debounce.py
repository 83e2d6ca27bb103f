"""Debouncing of GPIO inputs: pure debounce state, and the edge-notified inputs that use it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeVar

from hal.errors import HalError, HardwareFault
from hal.gpio.lines import GpioLibrary, InputLines
from hal.gpio.options import Pull, effective_pull, library_filter_ms

K = TypeVar("K")


class Debouncer(Generic[K]):
    """Debounce of edge-notified inputs, as pure state (no clock, no I/O).

    Every edge on an input gets a token and (re)starts a quiet window; the caller reads the
    level when that window closes and hands it in with the token. Only the sample of the latest
    edge counts, and it is reported only if it differs from the last reported state: a bounce
    shorter than the window reports nothing, a stable change is reported once.
    """

    def __init__(self, states: Mapping[K, bool]) -> None:
        self._states = dict(states)
        self._pending: dict[K, int] = {}
        self._next_token = 0

    def edge(self, key: K) -> int:
        """An edge on `key`: returns the token its sample must carry."""
        self._next_token += 1
        self._pending[key] = self._next_token
        return self._next_token

    def sample(self, key: K, token: int, level: bool) -> bool | None:
        """The level read when the window of edge `token` closed: the new state, or None."""
        if self._pending.get(key) != token:
            return None  # a later edge re-opened the window; its own sample decides
        del self._pending[key]
        if self._states.get(key) == level:
            return None
        self._states[key] = level
        return level

    def force(self, key: K, level: bool) -> None:
        """Take `level` as the reported state (a direct read while nobody watches edges)."""
        self._states[key] = level

    def state(self, key: K) -> bool:
        return self._states[key]

    def states(self) -> dict[K, bool]:
        return dict(self._states)


class ScanDebouncer(Generic[K]):
    """Debounce of a scanned key matrix, as pure state.

    A key counts as pressed after `scans` consecutive scans saw it down, and as released after
    as many saw it up. `update` reports each press once, however long the key is held.
    """

    def __init__(self, scans: int) -> None:
        if scans < 1:
            raise ValueError("scans must be at least 1")
        self._scans = scans
        self._held: dict[K, None] = {}  # a dict keeps the order keys were pressed in
        self._runs: dict[K, int] = {}  # consecutive scans that disagree with the held state

    def update(self, down: Collection[K]) -> tuple[list[K], list[K]]:
        """One scan saw `down`; returns (keys now pressed, keys now released)."""
        pressed: list[K] = []
        released: list[K] = []
        for key in list(dict.fromkeys([*down, *self._held, *self._runs])):
            is_down = key in down
            if is_down == (key in self._held):
                self._runs.pop(key, None)
                continue
            run = self._runs.get(key, 0) + 1
            if run < self._scans:
                self._runs[key] = run
                continue
            self._runs.pop(key, None)
            if is_down:
                self._held[key] = None
                pressed.append(key)
            else:
                del self._held[key]
                released.append(key)
        return pressed, released

    @property
    def held(self) -> list[K]:
        return list(self._held)


class EdgeInputs:
    """Debounced, edge-notified switch inputs by name: what door, occupancy and tamper share.

    No polling: `run` sleeps until the library reports an edge, then reads the level once the
    line has been quiet for `debounce_ms` and reports it if it changed.
    """

    def __init__(
        self,
        *,
        pins: Mapping[str, int],
        library: GpioLibrary,
        active_low: bool,
        pull: Pull | None,
        debounce_ms: int,
        label: str,
        baseline: Mapping[str, bool] | None = None,
    ) -> None:
        self._pins = dict(pins)
        self._keys = {pin: key for key, pin in self._pins.items()}
        self._library = library
        self._active_low = active_low
        self._pull = effective_pull(pull, active_low=active_low)
        self._debounce_ms = debounce_ms
        self._label = label
        self._baseline = baseline
        self._lines: InputLines | None = None
        self._debouncer: Debouncer[str] | None = None
        self._watching = False

    def _open(self) -> tuple[InputLines, Debouncer[str]]:
        if self._lines is None:
            self._lines = self._library.inputs(
                list(self._pins.values()), active_low=self._active_low, pull=self._pull,
                filter_ms=library_filter_ms(self._debounce_ms), edges=True, label=self._label)
        if self._debouncer is None:
            # Kept when the lines are closed and opened again: what was reported stays known.
            if self._baseline is not None:
                states = {key: self._baseline[key] for key in self._pins}
            else:
                pins = list(self._pins.values())
                states = dict(zip(self._pins, self._lines.active_many(pins), strict=True))
            self._debouncer = Debouncer(states)
        return self._lines, self._debouncer

    def start(self) -> None:
        self._open()

    def read(self) -> dict[str, bool]:
        """The state as reported (debounced) while `run` watches; otherwise the level now."""
        lines, debouncer = self._open()
        if not self._watching:
            # Nobody watches edges now, so the level itself is the news; a level caught
            # mid-bounce is corrected by `run`, which confirms every input when it starts.
            for key, active in zip(self._pins, lines.active_many(list(self._pins.values())),
                                   strict=True):
                debouncer.force(key, active)
        return debouncer.states()

    async def run(self, on_change: Callable[[str, bool], None]) -> None:
        """Call `on_change(key, active)` for every debounced change until cancelled."""
        lines, debouncer = self._open()
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        timers: dict[str, asyncio.TimerHandle] = {}
        window_s = self._debounce_ms / 1000

        def fail(exc: HalError) -> None:
            if not failed.done():
                failed.set_exception(exc)

        def sample(key: str, token: int) -> None:
            timers.pop(key, None)
            try:
                active = lines.active(self._pins[key])
            except HardwareFault as exc:
                fail(exc)
                return
            changed = debouncer.sample(key, token, active)
            if changed is not None:
                on_change(key, changed)

        def edge(pin: int) -> None:
            key = self._keys.get(pin)
            if key is None or failed.done():
                return
            token = debouncer.edge(key)
            old = timers.pop(key, None)
            if old is not None:
                old.cancel()
            timers[key] = loop.call_later(window_s, sample, key, token)

        lines.watch(loop, edge, fail)
        self._watching = True
        try:
            # Whatever changed while nobody watched (before the first run, or while a crashed
            # run waited to be restarted) is confirmed and reported like an edge.
            for pin in self._pins.values():
                edge(pin)
            await failed
        finally:
            self._watching = False
            lines.unwatch()
            for handle in timers.values():
                handle.cancel()

    def close(self) -> None:
        if self._lines is not None:
            self._lines.close()
            self._lines = None
