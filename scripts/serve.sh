#!/usr/bin/env bash
# Set up (idempotent) and start the web demo on http://127.0.0.1:7860; extra arguments go to `ctfgen serve`
# (e.g. --port 8000, --pipeline DIR). Offline: the page loads nothing from outside this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ctfgen serve "$@"
