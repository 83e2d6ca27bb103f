"""`lockerd demo` in a real terminal (a pty) opens the UI; closing the terminal cleans up."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from termscreen import Screen

pytestmark = pytest.mark.e2e


ROWS, COLUMNS = 42, 130


def _read_until(master: int, screen: Screen, needle: str, timeout: float) -> None:
    """Read the terminal until `needle` is on its screen. On the screen, not in the output:
    a redraw may write only the cells that changed, so a text shown need not be written out
    as one run of characters (nor within one read)."""
    deadline = time.monotonic() + timeout
    while not screen.shows(needle):
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the terminal; it shows:\n{screen.text()}"
        if select.select([master], [], [], min(left, 0.1))[0]:
            try:
                screen.feed(os.read(master, 65536))
            except OSError:
                break


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
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    # The size is the pty's: COLUMNS and LINES, when set (pytest-xdist's workers have 80x24),
    # would win over it and squeeze the UI.
    env = {**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
           "TERM": "xterm-256color", "TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "demo", "--compartments", "4",
         *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
        start_new_session=True)
    os.close(slave)
    try:
        screen = Screen(ROWS, COLUMNS)
        _read_until(master, screen, "daemon.started", timeout=30)
        assert screen.shows("lockerd simulator")
        if args:
            # The daemon's real drivers on the emulated hardware's ptys: the title says so,
            # in a frame that may come after the event pane's.
            _read_until(master, screen, "emulated on ptys", timeout=30)
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
