#!/usr/bin/env bash
# Sets everything up and runs the simulator demo in this terminal (no broker needed).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/lockerd demo "$@"
