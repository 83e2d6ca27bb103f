"""`lockerd events`: prints a bank's events, and refuses a state_dir that holds no database."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from lockerd.dev.provision import BankKit

pytestmark = pytest.mark.e2e

LOCKERD = [sys.executable, "-m", "lockerd.cli.lockerd_cmd"]


def lockerd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOCKERD, *args], capture_output=True, text=True, timeout=60)


def test_events_of_a_wrong_state_dir_are_refused_and_nothing_is_created(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([])
    wrong = kit.directory / "no-such-state"
    config = kit.config_path.with_name("wrong.toml")
    config.write_text(_with_state_dir(kit.config_path.read_text(), str(wrong)))
    res = lockerd("events", "-c", str(config), "-n", "5")
    assert res.returncode == 1
    assert res.stdout == ""
    assert "no database there" in res.stderr and str(wrong / "lockerd.db") in res.stderr
    assert "state_dir" in res.stderr and "Traceback" not in res.stderr
    assert not wrong.exists(), "neither the directory nor an empty database is made"
    # The right state_dir still works once the daemon (here: an import) made the database.
    assert lockerd("import-keyring", "-c", str(kit.config_path),
                   str(kit.keyring_path)).returncode == 0
    res = lockerd("events", "-c", str(kit.config_path), "-n", "5")
    assert res.returncode == 0
    assert json.loads(res.stdout.splitlines()[-1])["type"] == "keyring.updated"


def _with_state_dir(toml: str, state_dir: str) -> str:
    lines = [f"state_dir = {json.dumps(state_dir)}" if line.startswith("state_dir") else line
             for line in toml.splitlines()]
    assert lines != toml.splitlines(), "the kit's config names a state_dir"
    return "\n".join(lines) + "\n"
