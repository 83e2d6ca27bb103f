"""`lockerd import-bundle` puts itself on the idle CPU policy, and runs on where it cannot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lockerd.cli import cpupolicy

pytestmark = pytest.mark.unit


def test_the_process_is_put_on_the_idle_policy() -> None:
    # In a child: the policy is the calling process's, and the test runner keeps its own.
    probe = ("import os; from lockerd.cli.cpupolicy import yield_cpu_to_others; "
             "print(os.sched_getscheduler(0) == os.SCHED_IDLE, yield_cpu_to_others(), "
             "os.sched_getscheduler(0) == os.SCHED_IDLE)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "True", "True"]


def test_a_policy_that_cannot_be_set_leaves_the_process_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(1, "Operation not permitted")

    before = os.sched_getscheduler(0)
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert cpupolicy.yield_cpu_to_others() is False
    assert os.sched_getscheduler(0) == before


def test_without_the_idle_policy_nothing_is_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "SCHED_IDLE")
    assert cpupolicy.yield_cpu_to_others() is False
