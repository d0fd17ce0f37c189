"""The sampling settings of one stage, checked when made.

One dataclass serves every stage: stage 1 (or the baseline) and stage 2 each get a `SamplingParams`.
It imports no torch, so that the CLI builds its flags, defaults and help lines from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctfgen.validation import NON_NEGATIVE, Real, Whole, check_fields

MAX_STAGE2_STEPS = 1024  # more passes than positions reveal nothing new (a 32x32 grid has 1024)


def whole_number(value, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum], or one error naming `what`: `Whole(minimum, maximum).check`."""
    return Whole(minimum, maximum).check(value, what)


@dataclass(frozen=True)
class SamplingParams:
    """How one stage turns logits into tokens. The defaults change nothing: no temperature, no filter,
    no guidance. `cfg_interval` applies to the autoregressive stages only (stage 1, the baseline): N >= 0 guides
    image tokens 0 to N + 1, the first N + 2, exactly as LlamaGen's `generate(cfg_interval=N)`; -1 guides all.
    `steps` applies to stage 2 only: its passes over the grid (1: the paper's one-pass refiner; more need a refiner
    trained with `--reveal`, see `ctfgen.sampling.refine`)."""

    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature; 0 takes the most likely token", "rule": Real(0)})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)",
                                            "rule": NON_NEGATIVE})
    top_p: float = field(default=1.0, metadata={
        "help": "sample among the most likely tokens whose probabilities add up to p (1 = off)",
        "rule": Real(0, 1, low_open=True)})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (1 = off)",
                                                    "rule": Real(1)})
    cfg_interval: int = field(default=-1, metadata={
        "help": "guide image tokens 0 to N+1 only (the first N+2), as LlamaGen's cfg_interval (-1 = all)",
        "rule": Whole(-1), "only": "autoregressive"})
    steps: int = field(default=1, metadata={
        "help": "passes over the grid, each keeping the most confident tokens (MaskGIT's cosine schedule) for the "
                "next to see; 1 = the paper's one-pass refiner, more need a refiner trained with --reveal",
        "rule": Whole(1, MAX_STAGE2_STEPS), "only": "stage2"})

    def __post_init__(self):
        check_fields(self)  # frozen or not: the values are stored normalised (3.0 -> 3)

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
