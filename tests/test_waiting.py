"""The tests' one way of waiting: until, until_sync, until_value poll, return or fail clearly."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from waiting import until, until_sync, until_value

pytestmark = pytest.mark.unit


async def test_until_returns_once_the_condition_holds() -> None:
    calls = itertools.count(1)
    await until(lambda: next(calls) >= 3, 5)
    assert next(calls) == 4  # polled exactly until the third call was true


async def test_until_awaits_an_async_condition() -> None:
    flag = asyncio.Event()
    asyncio.get_running_loop().call_soon(flag.set)

    async def is_set() -> bool:
        return flag.is_set()

    await until(is_set, 5)
    assert flag.is_set()


async def test_until_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.02 s waiting for the door"):
        await until(lambda: False, 0.02, what="the door")


async def test_until_shows_the_state_at_the_deadline() -> None:
    seen: list[int] = []

    def holds() -> bool:
        seen.append(len(seen))
        return False

    with pytest.raises(AssertionError, match=r"polls: \[0, 1"):
        await until(holds, 0.02, what=lambda: f"polls: {seen}")


def test_until_sync_polls_without_an_event_loop() -> None:
    calls = itertools.count(1)
    until_sync(lambda: next(calls) >= 2, 5)
    assert next(calls) == 3
    with pytest.raises(AssertionError, match="waiting for nothing"):
        until_sync(lambda: False, 0.02, what="nothing")


async def test_until_value_returns_the_value_that_satisfied_it() -> None:
    values = iter(range(10))

    async def fetch() -> int:
        return next(values)

    assert await until_value(fetch, lambda v: v >= 4, 5) == 4


async def test_until_value_reports_the_last_value() -> None:
    async def fetch() -> dict[str, str]:
        return {"display": "Enter code"}

    with pytest.raises(AssertionError, match=r"the prompt; last \{'display': 'Enter code'\}"):
        await until_value(fetch, lambda s: s["display"] == "Size?", 0.02, what="the prompt")
