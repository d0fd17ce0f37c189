"""The sampling settings of one stage, checked when made.

One dataclass serves every stage: stage 1 (or the baseline) and stage 2 each get a `SamplingParams`.
It imports no torch, so that the CLI builds its flags, defaults and help lines from these fields.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ctfgen.errors import CtfgenError


def whole_number(value, what: str, minimum: int | None = None) -> int:
    """`value` as an int: ints and integral floats pass (3.0 -> 3); bools, fractions, NaN and text do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise CtfgenError(f"{what} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise CtfgenError(f"{what} must be at least {minimum}, got {int(value)}")
    return int(value)


def finite_number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CtfgenError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one stage turns logits into tokens. The defaults change nothing: no temperature, no filter,
    no guidance. `cfg_interval` applies to the autoregressive stages only (stage 1, the baseline): N >= 0 guides
    image tokens 0 to N + 1, the first N + 2, exactly as LlamaGen's `generate(cfg_interval=N)`; -1 guides all."""

    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 takes the most likely token"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={
        "help": "sample among the most likely tokens whose probabilities add up to p (1 = off)"})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (1 = off)"})
    cfg_interval: int = field(default=-1, metadata={
        "help": "guide image tokens 0 to N+1 only (the first N+2), as LlamaGen's cfg_interval (-1 = all)"})

    def __post_init__(self):
        checked = {"temperature": finite_number(self.temperature, "temperature"),
                   "top_k": whole_number(self.top_k, "top_k", minimum=0),
                   "top_p": finite_number(self.top_p, "top_p"),
                   "cfg_scale": finite_number(self.cfg_scale, "cfg_scale"),
                   "cfg_interval": whole_number(self.cfg_interval, "cfg_interval", minimum=-1)}
        if checked["temperature"] < 0:
            raise CtfgenError(f"temperature must be >= 0 (0 takes the most likely token), got {self.temperature}")
        if not 0 < checked["top_p"] <= 1:
            raise CtfgenError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if checked["cfg_scale"] < 1:
            raise CtfgenError(f"cfg_scale must be >= 1 (1 disables guidance), got {self.cfg_scale}")
        for name, value in checked.items():  # frozen: store the normalised values (3.0 -> 3)
            object.__setattr__(self, name, value)

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def guides_token(self, t: int) -> bool:
        """Whether image token t (from 0) is sampled with guidance, where guidance is on. LlamaGen's generate()
        guides its prefill token (token 0) and then decode steps i = 0 .. cfg_interval, which sample tokens
        1 .. cfg_interval + 1; kept as it is, so that a LlamaGen config means the same here."""
        return self.cfg_interval < 0 or t <= self.cfg_interval + 1


# What a pipeline samples with unless told otherwise: guided stage 1 (or baseline), plain stage 2, 64 images a batch.
STAGE1_DEFAULTS = SamplingParams(cfg_scale=2.0)
STAGE2_DEFAULTS = SamplingParams()
DEFAULT_BATCH_SIZE = 64
