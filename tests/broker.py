"""A real Mosquitto broker for the suite, on a free loopback port, that tests stop and restart."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: run ./scripts/test.sh, which installs it")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    """The free port this broker chose was taken before mosquitto could listen on it."""


class Broker:
    """One mosquitto process; `stop()` and `start()` keep the same port, like a real outage."""

    def __init__(self, directory: Path, *, extra_config: str = "", port: int | None = None,
                 persistence: bool = False, anonymous: bool = True,
                 listener: str | None = None) -> None:
        """`listener`, when given, is a configuration of its own (a shipped fragment, with its
        `listener` line on `port`) in place of the plain listener that allows or refuses
        anonymous clients; the user, persistence and log lines are added either way."""
        self.directory = directory
        self.port = port or free_port()
        # A port found free may be taken before mosquitto binds it (by another test process,
        # or any connection's local port): one this class chose it may choose again, once,
        # at the first start. A port given, and a restart's, stay what they are.
        self._may_move = port is None and listener is None
        self.host = "127.0.0.1"
        self.log = directory / "mosquitto.log"
        self.config = directory / "mosquitto.conf"
        self._persistence, self._anonymous = persistence, anonymous
        self._listener, self._extra_config = listener, extra_config
        self._write_config()
        self._proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        persistence, anonymous = self._persistence, self._anonymous
        listener, extra_config, directory = self._listener, self._extra_config, self.directory
        lines = [
            # Run as whoever runs the suite: as root, mosquitto would otherwise switch to its
            # own user and lose access to the test's private directory.
            f"user {getpass.getuser()}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {directory}/",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if listener is None:
            lines += [f"listener {self.port} 127.0.0.1",
                      f"allow_anonymous {'true' if anonymous else 'false'}"]
        else:
            lines.append(listener)
        if extra_config:
            lines.append(extra_config)
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        try:
            self._start()
        except _PortTaken:
            self.port = free_port()
            self._write_config()
            self._start()
        finally:
            self._may_move = False

    def _start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                self._close_pipes(self._proc)
                self._proc = None
                if self._may_move and "Address already in use" in err + log:
                    raise _PortTaken
                raise RuntimeError(f"mosquitto exited at start: {err} {log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    time.sleep(0.05)  # listening is not yet serving; a breath avoids a reset
                if self._proc.poll() is None:
                    return
                # Whoever answered, it was not this mosquitto, which has exited: see why.
            except OSError:
                if time.monotonic() > deadline:
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
        self._close_pipes(proc)

    @staticmethod
    def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
        # The stderr pipe (read only when mosquitto fails to start) is ours to close.
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()
