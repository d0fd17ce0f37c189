#!/usr/bin/env bash
# Set up a fresh machine: Fashion-MNIST from Debian, a virtualenv with the CPU build of PyTorch, ctfgen.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${CTFGEN_DATA:-}" ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -d .venv ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0   # the CPU wheel; a bare `torch` may pull a multi-GB CUDA build
.venv/bin/pip install -q -e ".[test,web]"  # web: the demo (ctfgen serve), tested in the suite
