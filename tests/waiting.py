"""Waiting in tests: poll a condition until it holds, or fail once a deadline has passed."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# What a timed-out wait was for: a text, or a function giving one (to show the latest state).
What = str | Callable[[], str]

POLL_S = 0.005


def _describe(what: What, predicate: object, timeout: float) -> str:
    text = what() if callable(what) else what
    return f"timed out after {timeout} s waiting for {text or predicate}"


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, *,
                what: What = "", interval: float = POLL_S) -> None:
    """Poll `predicate` (plain or async) until it is true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(_describe(what, predicate, timeout))
        await asyncio.sleep(interval)


def until_sync(predicate: Callable[[], bool], timeout: float = 5.0, *, what: What = "",
               interval: float = POLL_S) -> None:
    """`until` for code outside an event loop (a daemon in a subprocess): blocks while polling."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(_describe(what, predicate, timeout))
        time.sleep(interval)


async def until_value(fetch: Callable[[], Awaitable[T]], holds: Callable[[T], bool],
                      timeout: float = 5.0, *, what: str = "", interval: float = POLL_S) -> T:
    """Fetch a value (the simulator's state, say) until `holds(value)`; return that value.
    The AssertionError after `timeout` seconds shows the last value fetched."""
    last: list[T] = []

    async def fetched_holds() -> bool:
        last[:] = [await fetch()]
        return holds(last[0])

    await until(fetched_holds, timeout, what=lambda: f"{what or holds}; last {last[0]!r}",
                interval=interval)
    return last[0]
