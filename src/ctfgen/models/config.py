"""The transformer's configuration: shapes (LlamaGen's presets and CPU-sized ones), checked when made.
Shared by the GPT (baseline and stage 1), the stage-2 refiner and their blocks; it imports no model code."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from ctfgen.errors import CtfgenError
from ctfgen.validation import (
    MAX_CLASSES,
    MAX_LAYERS,
    MAX_TOKENS,
    MAX_VOCAB,
    MAX_WIDTH,
    PROBABILITY,
    Real,
    Whole,
    check_fields,
    ruled,
)


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


VOCAB, WIDTH, P = Whole(1, MAX_VOCAB), Whole(1, MAX_WIDTH), PROBABILITY


@dataclass
class GPTConfig:
    vocab_size: int = ruled(16384, VOCAB)  # output (and, for the GPT, input) token vocabulary
    block_size: int = ruled(256, Whole(1, MAX_TOKENS))  # image tokens per sample: a square grid
    num_classes: int = ruled(1000, Whole(1, MAX_CLASSES))  # the embedding table has one more row: the null class
    dim: int = ruled(768, WIDTH)
    n_layer: int = ruled(12, Whole(1, MAX_LAYERS))
    n_head: int = ruled(12, WIDTH)
    multiple_of: int = ruled(256, WIDTH)  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = ruled(None, Real(0, 16, low_open=True))
    rope_base: float = ruled(10000.0, Real(0, low_open=True))
    norm_eps: float = ruled(1e-5, Real(0, 1, low_open=True))
    initializer_range: float = ruled(0.02, Real(0, 1))
    token_dropout_p: float = ruled(0.1, P)
    attn_dropout_p: float = ruled(0.0, P)
    resid_dropout_p: float = ruled(0.1, P)
    ffn_dropout_p: float = ruled(0.1, P)
    drop_path_rate: float = ruled(0.0, P)
    class_dropout_prob: float = ruled(0.1, P)

    def __post_init__(self):
        check_fields(self)
        if self.dim % self.n_head:
            raise CtfgenError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise CtfgenError(f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE; change dim or n_head")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise CtfgenError(f"block_size {self.block_size} is not a square number of tokens (grid side x side)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int:
        """The label id of the unconditional (CFG) class: the last row of the class embedding."""
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)


# Transformer shapes; vocab_size / block_size / num_classes are set per use with gpt_config().
MODEL_SHAPES = {
    # LlamaGen's class-conditional models (111M, 343M, 775M, 1.4B with V=16384).
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    # CPU-sized, for the bundled Fashion-MNIST setup.
    "GPT-M": dict(n_layer=8, n_head=6, dim=384),
    "GPT-S": dict(n_layer=6, n_head=4, dim=256),
    "GPT-XS": dict(n_layer=2, n_head=4, dim=256),  # a third of GPT-S: a cheap stage-2 refiner
    # For tests only.
    "GPT-tiny": dict(n_layer=2, n_head=2, dim=64),
}
GPT_PRESETS = {name: GPTConfig(**shape) for name, shape in MODEL_SHAPES.items()}


def config_from_preset(presets: dict, preset: str, **fields):
    """The config named `preset` in `presets` with `fields` replaced; one clear error for an unknown name or field."""
    if preset not in presets:
        raise CtfgenError(f"unknown model preset {preset!r}; use one of {', '.join(presets)}")
    try:
        return dataclasses.replace(presets[preset], **fields)
    except TypeError as e:
        raise CtfgenError(f"bad model option for {preset}: {e}") from None


def gpt_config(preset: str, vocab_size: int, block_size: int, num_classes: int, **overrides) -> GPTConfig:
    """A preset's shape with the data's vocabulary, grid and classes, e.g.
    `gpt_config("GPT-B", 16384, 256, 1000)` is LlamaGen's c2i GPT-B at 256px."""
    return config_from_preset(GPT_PRESETS, preset, vocab_size=vocab_size, block_size=block_size,
                              num_classes=num_classes, **overrides)
