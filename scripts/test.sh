#!/usr/bin/env bash
# Install (if needed) and run the linters and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
.venv/bin/ruff check .
set +e
.venv/bin/pytest -q "$@"
status=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected"; exit 1; fi
exit "$status"
