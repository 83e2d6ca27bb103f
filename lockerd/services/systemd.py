"""sd_notify over the NOTIFY_SOCKET datagram socket: READY, WATCHDOG, STOPPING, STATUS."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from lockerd.logs import get_logger

log = get_logger("lockerd.systemd")


class SdNotifier:
    """Talks to systemd when started by it (Type=notify); does nothing otherwise."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        if self._address and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]  # abstract namespace
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode("utf-8"), self._address)
            return True
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))
            return False
