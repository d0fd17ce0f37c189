#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, as CI does: the tests marked slow too (a plain `pytest` skips
# them). Extra arguments go to pytest; a later -m replaces this one (-m slow: the slow tests alone).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -m "slow or not slow" "$@"
