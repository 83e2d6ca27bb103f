"""`lockerd demo` as a newcomer uses it: read the printed codes, type one, take the parcel."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


class Terminal:
    """A `lockerd demo` process with its output read line by line in the background."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "demo", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                m = re.search(pattern, line)
                if m:
                    self.seen.remove(line)
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r}; output so far: {self.seen}")
            try:
                self.seen.append(self.lines.get(timeout=left))
            except queue.Empty:
                continue

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def test_demo_pickup_with_a_printed_code(tmp_path: Path) -> None:
    term = Terminal("--compartments", "4", "--dir", str(tmp_path))
    try:
        code = term.expect(r"compartment 1: (\d{6})").group(1)
        term.expect(r"Type 'help'")
        term.type("9999")  # a wrong code first: refused, with the reason on the display
        term.expect(r"\[display\] Code not recognised")
        term.type(code)
        term.expect(r"\[display\] Door 1 is open")
        term.expect(r"event #\d+ pickup.opened door 1 code p-1001")
        term.type("take 1")
        term.type("close 1")
        term.expect(r"event #\d+ pickup.completed door 1 code p-1001")
        term.type("state")
        term.expect(r"display: Thank you!")
        term.type("open 9")
        term.expect(r"simulator: .*9")
        term.type("frobnicate")
        term.expect(r"unknown command 'frobnicate'")
        term.type("quit")
        term.expect(r"lockerd demo stopped\.")
        assert term.proc.wait(timeout=15) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert (tmp_path / "bank" / "lockerd.toml").exists(), "--dir keeps the demo's files"


def test_demo_ends_cleanly_at_end_of_input(tmp_path: Path) -> None:
    term = Terminal("--dir", str(tmp_path))
    term.expect(r"Type 'help'")
    assert term.proc.stdin is not None
    term.proc.stdin.close()
    term.expect(r"lockerd demo stopped\.")
    assert term.proc.wait(timeout=15) == 0
