"""The daemon's side of an apply process: start it, send a request, read its replies.

Every call blocks and belongs to one worker thread (the pipe I/O releases the GIL); `kill`
may be called from any thread. A process that says nothing for `silence_s` (it reports
progress as it reads, verifies and stages) is killed, as is one whose pipe breaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lockerd.apply.frames import encode_request

CHILD_MODULE = "lockerd.apply.child"
SILENCE_S = 120.0
_CHUNK = 1 << 20
_STOP_S = 5.0


class ApplyProcessFailed(Exception):
    """The apply process died, hung or answered nonsense; what it was doing is not done
    (unless it was past its swap: the caller checks the codes version)."""


class ApplyProcess:
    """One child process running `python -m lockerd.apply.child DB PID`, for one thread
    (the thread that starts it must outlive it: the child dies with it, `die_with_parent`)."""

    def __init__(self, db_path: Path, *, silence_s: float = SILENCE_S) -> None:
        self._db_path = db_path
        self._silence_s = silence_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self.started_pid: int | None = None
        """The pid of the last child started (kept after it ended)."""

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs (benchmarks read its memory)."""
        proc = self._proc
        return None if proc is None or proc.returncode is not None else proc.pid

    def start(self) -> None:
        # fork_exec (or vfork): nothing of this process runs in the child but exec.
        proc = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, str(self._db_path), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdin is not None and proc.stdout is not None
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        self._buffer.clear()
        with self._lock:
            self._proc = proc
        self.started_pid = proc.pid

    def request(self, header: dict[str, Any], body: bytes | bytearray = b"") -> dict[str, Any]:
        """Send one request and return its final reply (progress lines only keep it alive).
        ApplyProcessFailed when the child dies, hangs or breaks the protocol: it is killed."""
        if self._proc is None:
            self.start()
        head, data = encode_request(header, body)
        try:
            self._write(head)
            self._write(data)
            while True:
                reply = self._read_line()
                if "progress" not in reply:
                    return reply
        except ApplyProcessFailed:
            self.kill()
            raise

    def _child(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None:
            raise ApplyProcessFailed("the apply process is not running")
        return proc

    def _write(self, data: bytes | bytearray) -> None:
        proc = self._child()
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        view = memoryview(data)
        while view:
            self._wait(fd, select.POLLOUT, "to read its request")
            try:
                view = view[os.write(fd, view[:_CHUNK]):]
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE: it went away
                raise ApplyProcessFailed(self._gone(f"its pipe broke ({exc.strerror})")) from exc

    def _read_line(self) -> dict[str, Any]:
        proc = self._child()
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while (end := self._buffer.find(b"\n")) < 0:
            self._wait(fd, select.POLLIN, "to answer")
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                raise ApplyProcessFailed(self._gone("it ended without an answer"))
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise ApplyProcessFailed(f"the apply process answered {line[:80]!r}") from exc
        if not isinstance(reply, dict):
            raise ApplyProcessFailed(f"the apply process answered {line[:80]!r}")
        return reply

    def _wait(self, fd: int, event: int, what: str) -> None:
        poller = select.poll()
        poller.register(fd, event)
        deadline = time.monotonic() + self._silence_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApplyProcessFailed(
                    f"the apply process did not go on for {self._silence_s:g} s {what}; killed")
            events = poller.poll(left * 1000)
            if events:
                return

    def _gone(self, what: str) -> str:
        proc = self._child()
        try:
            code = proc.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            return f"the apply process failed: {what}"
        return f"the apply process exited with status {code}: {what}"

    def kill(self) -> None:
        """Kill the child now (any thread); the next request starts another."""
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        """Let the child end (its stdin closed), killing it if it does not; then reap it."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
