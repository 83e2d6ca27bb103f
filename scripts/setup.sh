#!/usr/bin/env bash
# Sets up a development environment: a virtualenv in .venv with lockerd and its test tools.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "lockerd needs Python 3.11 or newer; '$PYTHON' is $("$PYTHON" --version 2>&1)." >&2
    echo "Set PYTHON=/path/to/python3.11 and run again." >&2
    exit 1
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian ships venv separately (python3-venv).
        rm -rf .venv
        as_root apt-get update -qq
        as_root apt-get install -y -qq python3-venv
        "$PYTHON" -m venv .venv
    fi
fi
# Install only when pyproject.toml changed since the last install (a stamp in .venv).
stamp=.venv/.lockerd-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    echo "$want" > "$stamp"
fi
# git keeps no file modes but the executable bit, so a fresh clone leaves the simulator's demo
# private keys readable by everyone and the daemon warns about it on every run. 0600 here
# keeps that warning for a key that really is exposed.
if [ -d config/sim/keys ]; then
    chmod 600 config/sim/keys/code_key config/sim/keys/*.key
fi
# The editable install leaves lockerd's own modules without bytecode, and the daemon's user
# (or PYTHONDONTWRITEBYTECODE) cannot write it at run time: every `lockerd` process and every
# apply process would compile the sources again (0.4 s of a 0.8 s import here, far more on a
# Pi). pip compiles the libraries it installs; this compiles ours, skipping what is current.
.venv/bin/python -m compileall -q -j 0 lockerd hal sim >/dev/null
