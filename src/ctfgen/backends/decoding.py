"""Which backend runs a GPT's cached decoding, chosen here for every caller (the sampler, bench, benchmarks):
`decode_backend(model)`.

- `PackedDecoder` (`cpu_decode.py`): on the CPU, in inference, in fp32 or in bf16 where the CPU runs it natively;
  in bf16 on CPUs with AVX512-BF16 its attention is a C++ kernel over position-major caches (`cpu_attention.py`),
  which `setup_caches` lays out.
- `EagerDecoder` (`eager.py`): the model's own step, everywhere else, and wherever the environment variable
  CTFGEN_DECODE_BACKEND=eager says so (the reference path, e.g. to rule the CPU backend out of a problem).

Either runs its step through torch.compile once `compile_decoding(model)` has been called.
"""

from __future__ import annotations

import os
import weakref

import torch

from ctfgen.backends import cpu_attention, cpu_decode
from ctfgen.backends.eager import EagerDecoder
from ctfgen.errors import CtfgenError
from ctfgen.models.gpt import GPT

DECODE_BACKEND_ENV = "CTFGEN_DECODE_BACKEND"
DECODE_BACKENDS = ("auto", "eager")

_COMPILED: weakref.WeakSet[GPT] = weakref.WeakSet()  # the models whose decode steps run compiled


def packed_backend_serves(model: GPT) -> bool:
    choice = os.environ.get(DECODE_BACKEND_ENV, "auto")
    if choice not in DECODE_BACKENDS:
        raise CtfgenError(f"{DECODE_BACKEND_ENV}={choice!r} is not a decode backend; set it to one of "
                          f"{', '.join(DECODE_BACKENDS)}, or unset it")
    return choice == "auto" and cpu_decode.serves(model)


def setup_caches(model: GPT, max_batch_size: int, dtype: torch.dtype | None = None, device=None) -> None:
    """`GPT.setup_caches` in the layout the model's decode backend reads fastest: position-major where the CPU
    backend will run and the attention kernel serves a cache of this dtype (built and loaded here, outside any
    compiled step), else the model's own layout."""
    weight = model.output.weight
    dtype, device = dtype or weight.dtype, torch.device(device or weight.device)
    position_major = (dtype == torch.bfloat16 and device.type == "cpu" and model.config.head_dim % 32 == 0
                      and packed_backend_serves(model) and cpu_attention.load())
    model.setup_caches(max_batch_size=max_batch_size, dtype=dtype, device=device, position_major=position_major)


def decode_backend(model: GPT) -> EagerDecoder | cpu_decode.PackedDecoder:
    """The decoder of the model's cached steps now (its caches set up by `setup_caches`): `PackedDecoder` where it
    serves (`cpu_decode.serves`) unless CTFGEN_DECODE_BACKEND=eager, else `EagerDecoder`."""
    compile = model in _COMPILED
    if packed_backend_serves(model):
        return cpu_decode.PackedDecoder(model, compile)
    return EagerDecoder(model, compile)


def compile_decoding(model: GPT) -> None:
    """Run the model's decode steps through torch.compile from now on (`eager.compiled`). Idempotent."""
    _COMPILED.add(model)


def decoding_compiled(model: GPT) -> bool:
    return model in _COMPILED
