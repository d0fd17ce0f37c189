"""Which backend runs a GPT's cached decoding, chosen here for every caller (the sampler, bench, benchmarks):
`decode_backend(model)`.

- `PackedDecoder` (`cpu_decode.py`): on the CPU, in inference, in fp32 or in bf16 where the CPU runs it natively.
- `EagerDecoder` (`eager.py`): the model's own step, everywhere else, and wherever the environment variable
  CTFGEN_DECODE_BACKEND=eager says so (the reference path, e.g. to rule the CPU backend out of a problem).

Either runs its step through torch.compile once `compile_decoding(model)` has been called.
"""

from __future__ import annotations

import os
import weakref

from ctfgen.backends import cpu_decode
from ctfgen.backends.eager import EagerDecoder
from ctfgen.errors import CtfgenError
from ctfgen.models.gpt import GPT

DECODE_BACKEND_ENV = "CTFGEN_DECODE_BACKEND"
DECODE_BACKENDS = ("auto", "eager")

_COMPILED: weakref.WeakSet[GPT] = weakref.WeakSet()  # the models whose decode steps run compiled


def decode_backend(model: GPT) -> EagerDecoder | cpu_decode.PackedDecoder:
    """The decoder of the model's cached steps now (its caches set up by `GPT.setup_caches`): `PackedDecoder` where
    it serves (`cpu_decode.serves`) unless CTFGEN_DECODE_BACKEND=eager, else `EagerDecoder`."""
    choice = os.environ.get(DECODE_BACKEND_ENV, "auto")
    if choice not in DECODE_BACKENDS:
        raise CtfgenError(f"{DECODE_BACKEND_ENV}={choice!r} is not a decode backend; set it to one of "
                          f"{', '.join(DECODE_BACKENDS)}, or unset it")
    compile = model in _COMPILED
    if choice == "auto" and cpu_decode.serves(model):
        return cpu_decode.PackedDecoder(model, compile)
    return EagerDecoder(model, compile)


def compile_decoding(model: GPT) -> None:
    """Run the model's decode steps through torch.compile from now on (`eager.compiled`). Idempotent."""
    _COMPILED.add(model)


def decoding_compiled(model: GPT) -> bool:
    return model in _COMPILED
