"""scripts/setup.sh on a fresh clone: the simulator's private demo keys end up mode 0600."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PRIVATE = ("code_key", "codes.key", "root.key")


def test_setup_makes_the_demo_private_keys_readable_by_the_owner_only(tmp_path: Path) -> None:
    clone = tmp_path / "lockerd"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", clone / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", clone / "pyproject.toml")
    shutil.copytree(REPO / "config" / "sim" / "keys", clone / "config" / "sim" / "keys")
    keys = clone / "config" / "sim" / "keys"
    for key in keys.iterdir():
        key.chmod(0o644)  # what git checks out: it stores no other mode
    # A virtualenv that is already installed (the stamp matches), so setup installs nothing.
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "python").symlink_to(sys.executable)
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()
    (clone / ".venv" / ".lockerd-installed").write_text(digest + "\n")
    res = subprocess.run(["bash", str(clone / "scripts" / "setup.sh")], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr
    modes = {key.name: stat.S_IMODE(key.stat().st_mode) for key in keys.iterdir()}
    assert {name: modes[name] for name in PRIVATE} == dict.fromkeys(PRIVATE, 0o600)
    assert modes["root.pub"] == modes["codes.pub"] == 0o644, "public halves stay readable"
