#!/usr/bin/env bash
# Set up (idempotent) with what the tests need, then run the whole test suite, as CI does: the tests marked slow too
# (a plain `pytest` skips them), each skipped test listed with its reason. Extra arguments go to pytest; a later -m
# replaces this one (-m slow: the slow tests alone).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/python -m pytest -m "slow or not slow" -rfEs "$@"
