"""Numeric precision: bf16 autocast where the hardware runs it fast, fp32 elsewhere.

CPUs without native bf16 (no AVX512-BF16 / AMX, e.g. AVX2-only machines) run bf16 matmuls 10-100x
slower than fp32, so `auto` only picks bf16 on CUDA or on CPUs that oneDNN reports bf16-capable.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ctfgen.choices import PRECISIONS as PRECISIONS  # the names resolve_precision takes, re-exported


def cpu_has_fast_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA or a bf16-capable CPU, else 'fp32'; other values pass through."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_fast_bf16() else "fp32"
    return precision


def resolve_dtype(precision: str, device: torch.device) -> tuple[str, torch.dtype]:
    """`resolve_precision`, and the dtype that precision computes in: bf16 or fp32."""
    precision = resolve_precision(precision, device)
    return precision, torch.bfloat16 if precision == "bf16" else torch.float32


def autocast_context(precision: str, device: torch.device):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
