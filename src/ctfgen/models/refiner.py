"""The CTF stage-2 refiner: coarse grid -> fine-token logits at every position, in one pass.

A bidirectional transformer built from the GPT's blocks (`gpt.py`) without the causal mask: the
input is [class token] + embeddings of the K-way coarse labels of the whole grid, with the GPT's
2-D RoPE positions; the output is V-way fine-token logits at every grid position. Class dropout
is kept so that stage 2 can use classifier-free guidance too. Restricting a position's fine token
to its cluster is the sampler's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctfgen.models.config import MODEL_SHAPES, GPTConfig, config_from_preset
from ctfgen.models.gpt import ClassConditionalTransformer

CHECKPOINT_KIND = "refiner"


@dataclass
class RefinerConfig(GPTConfig):
    """GPTConfig plus the input vocabulary: coarse labels in [0, coarse_vocab_size) go in, fine
    tokens in [0, vocab_size) come out."""

    coarse_vocab_size: int = 512


REFINER_PRESETS = {name: RefinerConfig(**shape) for name, shape in MODEL_SHAPES.items()}


def refiner_config(preset: str, coarse_vocab_size: int, vocab_size: int, block_size: int, num_classes: int,
                   **overrides) -> RefinerConfig:
    """A preset's shape (the GPT's names: "GPT-B", ..., "GPT-S", "GPT-tiny") for K coarse labels in,
    V fine tokens out."""
    return config_from_preset(REFINER_PRESETS, preset, coarse_vocab_size=coarse_vocab_size, vocab_size=vocab_size,
                              block_size=block_size, num_classes=num_classes, **overrides)


class Refiner(ClassConditionalTransformer):
    checkpoint_kind = CHECKPOINT_KIND
    config_class = RefinerConfig

    def __init__(self, config: RefinerConfig):
        super().__init__(config, config.coarse_vocab_size, causal=False)

    def hidden(self, coarse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The normalised last hidden states [B, T, dim] of the grid positions: what the output head reads.
        Sampling within clusters turns them into the logits of a cluster's members only (`member_logits`)."""
        self.check_length(coarse.shape[1])
        return self.norm(self.hidden_states(labels, coarse)[:, 1:])  # without the class-token position

    def member_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The fp32 logits of the fine tokens token_ids [n] at hidden states [..., dim] (from `hidden`): [..., n],
        those columns of the full logits, at the cost of n of the vocab_size output rows. Batched: token_ids [G, n]
        for hidden [G, rows, dim] gives [G, rows, n], group g's rows against its own tokens."""
        rows = self.output.weight.index_select(0, token_ids.flatten()).view(*token_ids.shape, -1)  # row copies
        return (hidden @ rows.mT).float()

    def forward(self, coarse: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None):
        """coarse [B, T] coarse labels of a grid in raster order (T <= block_size, normally the whole
        grid), labels [B] class ids (num_classes = null class).

        Returns (logits [B, T, vocab_size] fp32, loss or None): logits[:, t] is the fine token at
        position t given the class and the WHOLE coarse grid. With targets [B, T] (the fine tokens),
        loss is the mean cross-entropy (ignore_index -100). Class dropout applies in training mode.
        """
        return self.logits_and_loss(self.hidden(coarse, labels), targets)


__all__ = ["Refiner", "RefinerConfig", "REFINER_PRESETS", "refiner_config"]
