"""The heap built at start-up is frozen while the daemon runs and thawed when it stops."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST, running

from lockerd.dev.provision import BankKit, make_bank

pytestmark = pytest.mark.e2e


async def test_the_start_heap_is_frozen_while_running_and_thawed_at_the_stop(
        make_kit: Callable[..., BankKit]) -> None:
    assert gc.get_freeze_count() == 0, "an app of an earlier test still runs in this process"
    async with running(make_kit([])):
        # Out of the collector's sight: a full collection no longer walks the modules, the
        # config and the app (bench/parts_over_mqtt.py: a 35-50 ms tick without this).
        assert gc.get_freeze_count() > 10_000
        before = gc.get_freeze_count()
        garbage: list[list[object]] = [[] for _ in range(100)]
        for item in garbage:
            item.append(item)  # cycles made after the start: collected as ever
        del garbage, item
        assert gc.collect() >= 100
        assert gc.get_freeze_count() == before
    assert gc.get_freeze_count() == 0


async def test_two_apps_in_one_process_thaw_only_when_both_have_stopped(
        tmp_path: Path) -> None:
    first = make_bank(tmp_path / "a", codes=[], overrides=FAST)
    second = make_bank(tmp_path / "b", codes=[], overrides=FAST)
    async with running(first):
        async with running(second):
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0, "the first app still runs"
    assert gc.get_freeze_count() == 0
