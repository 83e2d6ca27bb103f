"""The demo's transcript as a person reads it: each display change once, every hand movement
answered, refusals with their reason, a way back into service, a prompt and colour on a
terminal only, and a closed terminal cleaning up like Ctrl-C."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from demo_terminal import Terminal

pytestmark = pytest.mark.e2e


def _stopped(term: Terminal) -> None:
    term.type("quit")
    term.expect(r"lockerd demo stopped\.")
    assert term.proc.wait(timeout=15) == 0


def test_lockout_is_printed_once_and_refusals_carry_their_reason(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        term.expect(r"Type 'help'")
        for attempt in range(5):
            term.type(f"99999{attempt}")
            term.expect(r"event #\d+ code\.rejected reason unknown_code$")
        term.expect(r"event #\d+ keypad\.lockout")
        term.type("123456")  # seven keys pressed in the lockout: the same message each time
        term.type("state")
        term.expect(r"display: Too many wrong codes")
        _stopped(term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    shown = [line for line in term.output if line.startswith("  [display] Too many wrong")]
    assert shown, term.output
    assert len(shown) == len(set(shown)), shown  # a new countdown second may show; no repeat
    # Not a terminal: no prompt and no colour.
    assert not any("bank> " in line or "\x1b[" in line for line in term.output)


def test_take_and_put_say_what_happened_or_why_not(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        code = term.expect(r"compartment 1: (\d{6})").group(1)
        term.expect(r"Type 'help'")
        term.type("take 1")
        term.expect(r"^door 1 is closed: a person cannot reach in")
        term.type("put 9")
        term.expect(r"^no compartment '9' in this bank \(1-4\)")
        term.type("take")
        term.expect(r"^usage: take N")
        term.type(code)
        term.expect(r"event #\d+ pickup\.opened door 1 code p-1001")
        term.type("put 1")
        term.expect(r"^compartment 1 already holds a parcel: 'take 1' first")
        term.type("take 1")
        term.expect(r"^the parcel is out of compartment 1; 'close 1' shuts the door")
        term.type("take 1")
        term.expect(r"^compartment 1 is empty: there is nothing to take")
        term.type("close 1")
        term.expect(r"event #\d+ pickup\.completed door 1 code p-1001")
        term.type("force 4")
        term.expect(r"event #\d+ door\.forced door 4")
        term.type("put 4")
        term.expect(r"^a parcel is now in compartment 4; 'close 4' shuts the door")
        term.type("state")
        term.expect(r"^\s+4\s+L\s+released\s+open\s+yes\s+")
        _stopped(term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_service_puts_a_jammed_compartment_back_in_service(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        code = term.expect(r"compartment 2: (\d{6})").group(1)
        term.expect(r"Type 'help'")
        term.type("help")
        term.expect(r"service N \[off\]")
        term.type("jam 2")
        term.type(code)
        term.expect(r"event #\d+ door\.jammed door 2 code p-1002")
        term.type("#")  # the guided retry, the lock still jammed: out of service
        term.expect(r"event #\d+ compartment\.out_of_service door 2 reason jammed$")
        term.type("state")
        term.expect(r"^\s+2\s+M\s+locked\s+closed\s+yes\s+OUT\s+")
        term.type("service 2")
        term.expect(r"event #\d+ compartment\.in_service door 2")
        term.expect(r"^compartment 2 is in service again")
        term.expect(r"^\(its lock is still jammed: the next opening jams again; 'unjam 2'")
        term.type("service 2")
        term.expect(r"^compartment 2 is already in service")
        term.type("unjam 2")
        term.expect(r"^lock 2 works again$")
        term.type(code)  # the code was never used: it opens the door now
        term.expect(r"event #\d+ pickup\.opened door 2 code p-1002")
        term.type("service 3 off")
        term.expect(r"event #\d+ compartment\.out_of_service door 3 reason technician at the "
                    r"bank \(demo\)")
        term.expect(r"^compartment 3 is out of service: no code opens it until 'service 3'")
        term.type("unjam 3")
        term.expect(r"^lock 3 works again; compartment 3 is still out of service: 'service 3' "
                    "puts it back")
        term.type("service 3 maybe")
        term.expect(r"^usage: service N \(back in service\) \| service N off")
        term.type("service 7")
        term.expect(r"^no compartment '7' in this bank")
        _stopped(term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


@pytest.mark.parametrize("when", ["at once", "while it reads commands"])
def test_a_closed_terminal_sighup_cleans_up_like_ctrl_c(when: str) -> None:
    term = Terminal("--compartments", "4")
    try:
        files = Path(term.expect(r"^lockerd demo: .*\(files in (.+)\)$").group(1))
        assert (files / "bank" / "keys").is_dir()
        if when != "at once":
            term.expect(r"Type 'help'")
            term.type("state")
            term.expect(r"^\s+display: ")
        term.proc.send_signal(signal.SIGHUP)
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert not files.exists(), "the temporary directory and its demo keys are removed"
    assert "Traceback" not in "\n".join(term.output)


class _Pty:
    """`lockerd demo --plain` on a pseudo-terminal, as a person in a terminal runs the
    transcript (without --plain a terminal gets the UI: tests/test_ui_terminal.py)."""

    def __init__(self, *args: str, **env: str) -> None:
        master, slave = os.openpty()
        environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "demo", "--plain",
             "--compartments", "4", *args],
            stdin=slave, stdout=slave, stderr=slave, env={**environ, "TERM": "xterm", **env},
            close_fds=True)
        os.close(slave)
        self.master = master
        self.output = b""
        self._lock = threading.Lock()
        self._hang_up = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        try:
            while not self._hang_up.is_set():
                if not select.select([self.master], [], [], 0.05)[0]:
                    continue
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every end of the slave side is closed
                    return
                if not chunk:
                    return
                with self._lock:
                    self.output += chunk
        finally:
            # The only thread that reads the master closes it: a close from another thread
            # while this one is in read() would not take effect until that read returns.
            os.close(self.master)

    def hang_up(self) -> None:
        """Close the terminal window: the master side goes away."""
        self._hang_up.set()
        self._pump_thread.join(timeout=5)

    def text(self) -> str:
        with self._lock:
            return self.output.decode("utf-8", "replace")

    def expect(self, pattern: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text()!r}"
            time.sleep(0.02)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode() + b"\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        self.hang_up()


@pytest.mark.parametrize("no_color", ["", "1"])
def test_a_terminal_gets_a_prompt_and_colour_unless_no_color(tmp_path: Path,
                                                             no_color: str) -> None:
    term = _Pty("--dir", str(tmp_path), **({"NO_COLOR": no_color} if no_color else {}))
    try:
        term.expect(r"bank> ")
        term.type("frobnicate")
        term.expect(r"unknown command 'frobnicate'")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
        text = term.text()
        assert text.count("bank> ") >= 2  # again after each command
        if no_color:
            assert not re.search(r"\x1b\[[0-9;]*m", text)  # no colour (SGR) at all
        else:
            assert "\x1b[31munknown command 'frobnicate'" in text
            assert "\x1b[1mbank> \x1b[0m" in text
    finally:
        term.close()


def test_a_terminal_gone_mid_session_ends_the_demo_and_cleans_up() -> None:
    term = _Pty()
    try:
        term.expect(r"bank> ")
        found = re.search(r"\(files in (.+?)\)", term.text())
        assert found is not None
        files = Path(found.group(1))
        assert files.is_dir()
        term.hang_up()  # the terminal window is closed: its reads and writes fail
        assert term.proc.wait(timeout=15) == 0
        assert not files.exists()
    finally:
        term.close()
