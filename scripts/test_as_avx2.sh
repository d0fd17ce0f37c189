#!/usr/bin/env bash
# The whole test suite as an AVX2-only CPU runs it, on any x86 machine: ATen's kernels, oneDNN and MKL limited to
# AVX2 (so bf16 is emulated and slow, as there), and a fresh torch.compile cache (compiled kernels are cached by
# code, not by instruction set: kernels built for AVX-512 earlier would be reused otherwise).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 TORCHINDUCTOR_CACHE_DIR="$cache" \
  scripts/test.sh "$@"
