"""The shipped systemd unit: notify, watchdog, restart, hardening, and valid to systemd."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "lockerd.service"


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


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
