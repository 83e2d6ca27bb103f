"""Importing one module of hal, hal.kerong or lockerd.trust loads what that module imports, not
every sibling: their package __init__ files re-export nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

# (the module imported, a module of the same package it has no use for)
PROBES = [
    ("hal.base", "hal.registry"),  # the device bases need no backend loader
    ("hal.kerong.codec", "hal.base"),  # the pure codec is bytes in, bytes out
    ("lockerd.trust.digest", "lockerd.trust.dsse"),  # a code digest is an HMAC, no envelopes
    # `lockerd import-bundle` and `lockerd events` open the bank's database and cache
    # without the daemon's whole graph (the hal, MQTT, the services).
    ("lockerd.services.banksetup", "lockerd.app"),
    ("lockerd.services.banksetup", "lockerd.services.link"),
]


@pytest.mark.parametrize(("module", "sibling"), PROBES)
def test_importing_a_module_does_not_load_its_unneeded_siblings(module: str, sibling: str) -> None:
    # A fresh interpreter, so that nothing this suite imported already counts.
    probe = f"import sys, {module}; print({module!r} in sys.modules, {sibling!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["True", "False"], f"importing {module} loaded {sibling}"


@pytest.mark.parametrize("module", ["lockerd.cli.lockerd_cmd", "lockerd.app"])
def test_the_daemon_does_not_load_the_simulator_ui_library(module: str) -> None:
    # textual is for the demo's UI only: on a 512 MB board the daemon never pays for it.
    probe = f"import sys, {module}; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"], f"importing {module} loaded textual"


@pytest.mark.parametrize("module", ["lockerd.cli.lockerd_cmd", "lockerd.app",
                                    "lockerd.apply.child", "lockerd.cli.lockerctl_cmd"])
def test_lockerd_does_not_load_rich_through_structlog(module: str) -> None:
    # rich (installed with textual) would cost every start about 25 ms and a few MiB, for
    # tracebacks that lockerd renders as plain text.
    probe = f"import sys, {module}; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"], f"importing {module} loaded rich"


def test_rich_and_textual_still_import_after_lockerd_logs() -> None:
    # rich is hidden only while structlog is imported: the simulator's UI, in the same
    # process as the daemon's logging, still gets it.
    probe = ("import sys, lockerd.logs, rich.text, textual.app; "
             "print(sys.modules['rich'] is not None)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["True"]


def test_an_exception_logged_on_a_terminal_is_still_readable() -> None:
    # Without rich, structlog's console renderer writes the traceback as plain text.
    probe = ("import io, sys, lockerd.logs as logs\n"
             "class Tty(io.StringIO):\n"
             "    def isatty(self): return True\n"
             "out = Tty()\n"
             "logs.configure_logging('info', 'console', stream=out)\n"
             "try:\n"
             "    raise ValueError('boom')\n"
             "except ValueError:\n"
             "    logs.get_logger('t').exception('failed')\n"
             "sys.stdout.write(out.getvalue())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert "failed" in out.stdout
    assert "ValueError: boom" in out.stdout
    assert "Traceback" in out.stdout
    assert out.stderr == ""
