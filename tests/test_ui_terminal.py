"""`lockerd demo` in a real terminal (a pty) opens the UI; closing the terminal cleans up."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


_CONTROL = re.compile(rb"\x1b\[[0-9;?<>=$]*[A-Za-z~]")


def _read_until(master: int, needle: bytes, timeout: float) -> bytes:
    """What the terminal got until `needle` shows, looked for with the control sequences
    taken out (a redraw may write a line cell by cell, each cell at its own position)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in _CONTROL.sub(b"", seen):
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the terminal; it shows {seen[-400:]!r}"
        if select.select([master], [], [], min(left, 0.1))[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
    return seen


def _drain(master: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Read the terminal until the demo has exited (it must not block writing to it)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the demo did not exit"
        if select.select([master], [], [], 0.1)[0]:
            try:
                os.read(master, 65536)
            except OSError:  # every end of the slave side is closed
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                return


@pytest.mark.parametrize(("how", "args"), [("sighup", ()), ("q", ("--wire",))])
def test_a_terminal_gets_the_ui_and_leaving_it_stops_the_daemon_and_cleans_up(
        bank_dir: Path, how: str, args: tuple[str, ...]) -> None:
    temp = bank_dir / "tmp"  # short: the demo's control socket path has ~100 bytes at most
    temp.mkdir()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 42, 130, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "demo", "--compartments", "4",
         *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
        start_new_session=True)
    os.close(slave)
    try:
        shown = _read_until(master, b"daemon.started", timeout=30)
        assert b"lockerd simulator" in _CONTROL.sub(b"", shown)
        if args and b"emulated on ptys" not in _CONTROL.sub(b"", shown):
            # The daemon's real drivers on the emulated hardware's ptys: the title says so,
            # in a frame that may come after the event pane's.
            shown += _read_until(master, b"emulated on ptys", timeout=30)
        assert len(list(temp.iterdir())) == 1  # the demo's bank, keys and database
        if how == "sighup":
            proc.send_signal(signal.SIGHUP)  # the terminal window was closed
        else:
            os.write(master, b"q")
        _drain(master, proc, timeout=15)
        assert proc.wait(timeout=1) == 0
        assert list(temp.iterdir()) == [], "the temporary bank and its keys are removed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)
        os.close(master)
