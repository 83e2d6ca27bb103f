"""Pseudo-terminals for the wire-level emulators: the emulator keeps the master side."""

from __future__ import annotations

import os
import tty


def open_pty() -> tuple[int, str]:
    """A new pseudo-terminal: (master fd for the emulator, slave path for the driver's port).

    The slave is put in raw mode so no line discipline echoes or rewrites bytes before the
    driver opens (and configures) it; the emulator keeps only the master, as a board keeps only
    its end of the cable.
    """
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        path = os.ttyname(slave)
    except OSError:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return master, path
