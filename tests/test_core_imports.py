"""The core is the ground floor: importing any of lockerd.core loads no I/O, crypto or network
library (checked in a fresh interpreter, where nothing else has loaded them yet)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

# What the core must never pull in: crypto and token codecs (trust), the database (store),
# serial ports and MQTT (hal backends, services), the event loop and the log setup.
FORBIDDEN = ("cryptography", "cbor2", "base45", "sqlite3", "_sqlite3", "serial",
             "serial_asyncio", "aiomqtt", "paho", "asyncio", "structlog")

_PROBE = """
import importlib, json, pkgutil, sys
import lockerd.core
names = sorted(m.name for m in pkgutil.iter_modules(lockerd.core.__path__))
for name in names:
    importlib.import_module("lockerd.core." + name)
print(json.dumps({"core": names, "loaded": sorted({m.split(".")[0] for m in sys.modules}),
                  "lockerd": sorted(m for m in sys.modules if m.startswith("lockerd"))}))
"""


def test_importing_the_core_loads_no_io_or_crypto() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True,
                         text=True).stdout
    probe = json.loads(out)
    assert sorted(set(FORBIDDEN) & set(probe["loaded"])) == []
    assert {"bank", "events", "deposit", "compartment", "access"} <= set(probe["core"])
    # Nothing of lockerd beyond the core and the id rules: no trust, store or services.
    outside = [m for m in probe["lockerd"]
               if m not in ("lockerd", "lockerd.ids") and not m.startswith("lockerd.core")]
    assert outside == []
