#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, type check, pytest.
# Installs Mosquitto with apt-get when it is missing (the suite starts its own broker on a
# free loopback port; it never uses a system one). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "Installing Mosquitto (needed by the test suite)..."
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq mosquitto
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "Installing systemd's tools (the suite checks the unit file with systemd-analyze)..."
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq systemd
fi

./scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check lockerd hal sim tests bench
echo "== mypy --strict"
.venv/bin/mypy --strict lockerd hal sim
.venv/bin/mypy --strict tests bench
echo "== pytest"
# Three workers on two cores: the suite mostly waits (on daemons, brokers, ptys), so a third
# worker fills the time the other two wait. LOCKERD_TEST_WORKERS=0 runs it in one process.
exec .venv/bin/python -m pytest -n "${LOCKERD_TEST_WORKERS:-3}" --dist load "$@"
