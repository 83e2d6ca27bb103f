"""A Mosquitto of a benchmark's own on a free loopback port (a small copy of tests/broker.py, so
the benchmarks do not depend on the test suite)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 10.0


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process on 127.0.0.1, its log in `directory`. The port stays the same
    across stop and start. No persistence, unless `persistent`: then sessions, subscriptions
    and queued messages are saved in `directory` when it stops and restored when it starts."""

    def __init__(self, directory: Path, *, extra_config: str = "",
                 persistent: bool = False) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log = directory / "mosquitto.log"
        self.config = directory / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            # As root, mosquitto would otherwise switch to its own user and lose access to the
            # benchmark's private directory.
            f"user {getpass.getuser()}",
            "allow_anonymous true",
            *(["persistence true", f"persistence_location {directory}/", "autosave_interval 0"]
              if persistent else ["persistence false"]),
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if extra_config:
            lines.append(extra_config)
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C reaches the benchmark, which then stops the broker.
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                status, self._proc = self._proc.returncode, None
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited at start with status {status}: {log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    time.sleep(0.05)  # listening is not yet serving; a breath avoids a reset
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
