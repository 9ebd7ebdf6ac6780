#!/usr/bin/env bash
# Install (if needed) and run the default simulation: 5 hospitals, PneumoniaMNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
exec .venv/bin/medfed simulate "$@"
