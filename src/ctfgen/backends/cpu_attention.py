"""A decode step's attention over a bf16 KV cache on CPUs with AVX512-BF16: a C++ kernel (`cpu_attention.cpp`) and
the cache layout it streams.

A decode step has one query per row and head. Its attention reads the whole filled cache for a handful of FLOPs, so
it runs at the speed the cache arrives from memory. With the usual [rows, heads, positions, dim] cache the filled
part is a 4 KB piece per row and head, a gap after each; inductor's fused kernel for it reaches about a tenth of the
bandwidth a plain read gets. Here the cache is position-major ([positions, rows, heads, dim] in memory, seen through
the usual shape), so the filled part is one block, and the kernel walks it position by position: one stream, with
the scores' dot products in AVX512-BF16 instructions. docs/decoding.md has the measurements.

The kernel is built on first use by torch's extension builder (the C++ compiler torch.compile needs on a CPU, and
ninja), once per source version, into torch's extension cache. Where the CPU lacks AVX512-BF16 it is never built or
loaded; where the build fails, decoding says so once and goes on with `cpu_decode.attention_few_queries`, as do
other dtypes and steps of several queries. CTFGEN_CPU_ATTENTION=off switches it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
KERNEL_ENV = "CTFGEN_CPU_ATTENTION"
BUILD_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16"]


class _Kernel:
    module = None  # the built extension, once `load` has succeeded
    tried = False


def load() -> bool:
    """Build (once per source version) and load the kernel where this CPU runs it and it is not switched off; whether
    it is loaded. Call outside compiled code: the compiled step only asks `loaded()`."""
    if not _Kernel.tried:
        _Kernel.tried = True
        if os.environ.get(KERNEL_ENV, "on") != "off" and torch.cpu._is_avx512_bf16_supported():
            from torch.utils import cpp_extension
            try:
                _Kernel.module = cpp_extension.load("ctfgen_cpu_attention", [str(SOURCE)], extra_cflags=BUILD_FLAGS,
                                                    extra_ldflags=["-fopenmp"])
            except Exception as error:  # no compiler, no ninja, a read-only cache: decode without it
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                print(f"ctfgen: the CPU attention kernel did not build ({reason}); decoding goes on without it",
                      file=sys.stderr)
    return _Kernel.module is not None


def loaded() -> bool:
    return _Kernel.module is not None


def serves(keys: torch.Tensor) -> bool:
    """Whether the kernel computes the one-query attention over these cached keys (and values like them)."""
    return loaded() and keys.dtype == torch.bfloat16 and keys.device.type == "cpu" and keys.shape[-1] % 32 == 0


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _Kernel.module.decode_attention(q, keys, values)


# An operator that torch.compile keeps opaque, as cpu_decode's packed_linear.
if not hasattr(torch.ops.ctfgen, "decode_attention"):  # once per process
    _LIBRARY = torch.library.Library("ctfgen", "FRAGMENT")
    _LIBRARY.define("decode_attention(Tensor q, Tensor keys, Tensor values) -> Tensor")
    _LIBRARY.impl("decode_attention", _decode_attention, "CompositeExplicitAutograd")
    torch.library.register_fake("ctfgen::decode_attention", lambda q, keys, values:
                                q.new_empty(q.shape, dtype=torch.float32), lib=_LIBRARY)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q keys^T / sqrt(D)) values for one query per row and head: q [B, H, 1, D], keys / values
    [B, H, kv_len, D] bf16 (any layout with a contiguous last dimension; position-major streams) -> [B, H, 1, D] fp32.
    Only where `serves(keys)`."""
    if torch.compiler.is_compiling():
        return torch.ops.ctfgen.decode_attention(q, keys, values)
    return _decode_attention(q, keys, values)
