"""Startup check of a pyserial port URL: does pyserial have a handler for its scheme."""

from __future__ import annotations

import importlib

import serial  # type: ignore[import-untyped]

from hal.errors import BackendError


def check_port_url(port: str, where: str, *, key: str = "port") -> None:
    """Refuse, at startup, a port URL whose scheme pyserial has no handler for.

    Only the handler module is looked up (as serial_for_url does): nothing is opened, so a
    device path or a URL whose device is not plugged in yet passes. `where` names the table
    ("backends.kerong", "lockerd.toml: [hal.scanner.options]")."""
    table = where if "[" in where else f"[{where}]"
    if "\x00" in port:
        raise BackendError(f"{table}: the port must not contain a NUL character (key '{key}')")
    if "://" not in port:
        return  # a device path: whether it exists is a run-time matter (USB is hot-plugged)
    scheme = port.split("://", 1)[0].lower()
    for package in serial.protocol_handler_packages:
        try:
            importlib.import_module(f"{package}.protocol_{scheme}")
        except ImportError:
            continue
        return
    raise BackendError(
        f"{table}: port {port!r}: pyserial has no handler for {scheme}:// (key '{key}')"
    )
