#!/usr/bin/env bash
# Install (if needed), then ruff, the layer check (import-linter) and the whole test suite (what
# CI runs). Arguments go to pytest; the quick loop skips the multi-process tests:
# bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
.venv/bin/ruff check .
# The layers (.importlinter): cli > simulations > server | client > strategies | privacy | imaging
# > models > core.
.venv/bin/lint-imports
set +e
.venv/bin/pytest -q "$@"
status=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected"; exit 1; fi
exit "$status"
