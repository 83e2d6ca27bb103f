"""The shipped systemd unit: notify, watchdog, restart, hardening, and valid to systemd."""

from __future__ import annotations

import configparser
import grp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "lockerd.service"
DROP_IN = UNIT.parent / "lockerd.service.d" / "hardware-groups.conf"


def unit(path: Path = UNIT) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def device_allow() -> list[str]:
    return [line.removeprefix("DeviceAllow=") for line in UNIT.read_text().splitlines()
            if line.startswith("DeviceAllow=")]


def test_unit_has_notify_watchdog_restart_and_hardening() -> None:
    service = unit()["Service"]
    expected = {
        "Type": "notify", "Restart": "always", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "StateDirectory": "lockerd", "DevicePolicy": "closed",
        "User": "lockerd",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert int(service["WatchdogSec"]) > 0
    assert "lockerd run -c" in service["ExecStart"]
    text = UNIT.read_text()
    assert "DeviceAllow=/dev/gpiochip0 rw" in text and "DeviceAllow=char-ttyUSB rw" in text


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is part of systemd, present on Debian"
    # Point ExecStart at a binary that exists here; everything else is checked as shipped.
    copy = tmp_path / "lockerd.service"
    copy.write_text(UNIT.read_text().replace("/opt/lockerd/.venv/bin/lockerd", "/bin/true"))
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Unknown key" not in res.stderr and "Unknown" not in res.stderr, res.stderr


def test_unit_allows_every_kind_of_serial_port() -> None:
    allowed = device_allow()
    # USB CDC scanners (ttyACM) are the first kind docs/hardware-serial.md names.
    for kind in ("char-ttyACM", "char-ttyUSB", "char-ttyAMA", "char-ttyS"):
        assert f"{kind} rw" in allowed, kind


def test_unit_names_only_groups_that_exist_on_a_plain_debian() -> None:
    # A supplementary group that does not exist stops the unit with 216/GROUP. This machine is
    # a plain Debian without Raspberry Pi OS's gpio and i2c groups.
    groups = unit()["Service"]["SupplementaryGroups"].split()
    assert groups
    for group in groups:
        grp.getgrnam(group)  # KeyError: the unit would not start here
    extra = unit(DROP_IN)["Service"]["SupplementaryGroups"].split()
    assert sorted(extra) == ["gpio", "i2c"]


def test_systemd_accepts_the_unit_with_its_drop_in(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is part of systemd, present on Debian"
    (tmp_path / "lockerd.service").write_text(
        UNIT.read_text().replace("/opt/lockerd/.venv/bin/lockerd", "/bin/true"))
    (tmp_path / "lockerd.service.d").mkdir()
    (tmp_path / "lockerd.service.d" / DROP_IN.name).write_text(DROP_IN.read_text() + "Bogus=1\n")
    # SYSTEMD_UNIT_PATH makes systemd-analyze load the unit's drop-in directory from here; the
    # deliberate unknown key shows the drop-in was read.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    res = subprocess.run([analyze, "verify", "lockerd.service"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert "Bogus" in res.stderr, res.stderr
    (tmp_path / "lockerd.service.d" / DROP_IN.name).write_text(DROP_IN.read_text())
    res = subprocess.run([analyze, "verify", "lockerd.service"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Unknown" not in res.stderr, res.stderr
