#!/usr/bin/env bash
# On a CUDA machine: CTF against the baseline at GPT-B (256 tokens, V = 16384, K = 512, bf16, batch 64, CUDA-graph
# decode step) and a few FSDP training steps on one GPU, with random weights; prints one JSON line, in under
# 5 minutes. Uses the project's venv where there is one, else the machine's python3 (which must have torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
