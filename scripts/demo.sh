#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the demo on the bundled Fashion-MNIST model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ctfgen demo --out demo.png --overwrite "$@"  # replaces only a demo.png that ctfgen wrote
