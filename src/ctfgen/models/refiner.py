"""The CTF stage-2 refiner: coarse grid -> fine-token logits at every position, in one pass.

A bidirectional transformer built from the GPT's blocks (`gpt.py`) without the causal mask: the
input is [class token] + embeddings of the K-way coarse labels of the whole grid, with the GPT's
2-D RoPE positions; the output is V-way fine-token logits at every grid position. Class dropout
is kept so that stage 2 can use classifier-free guidance too. Restricting a position's fine token
to its cluster is the sampler's job.

With `fine_inputs` (beyond the paper, MaskGIT-style), the refiner also reads the fine tokens revealed so far: each
position adds the embedding of its fine token, or of a "hidden" token where none is known yet. In training a random
share of each grid is revealed (`reveal_share`) and the loss counts the hidden positions only, so that the sampler
can fill the grid in S steps, each step conditioned on the tokens it kept before (`ctfgen.sampling.refine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ctfgen.models.config import MODEL_SHAPES, VOCAB, GPTConfig, config_from_preset
from ctfgen.models.gpt import ClassConditionalTransformer
from ctfgen.validation import ruled

CHECKPOINT_KIND = "refiner"


@dataclass
class RefinerConfig(GPTConfig):
    """GPTConfig plus the input vocabulary: coarse labels in [0, coarse_vocab_size) go in, fine
    tokens in [0, vocab_size) come out."""

    coarse_vocab_size: int = ruled(512, VOCAB)
    fine_inputs: bool = False  # also read revealed fine tokens (S-step refinement); False: the paper's refiner


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
        # Row vocab_size is the "hidden" token: a position whose fine token is not known yet.
        self.fine_embeddings = nn.Embedding(config.vocab_size + 1, config.dim) if config.fine_inputs else None
        if self.fine_embeddings is not None:
            nn.init.normal_(self.fine_embeddings.weight, std=config.initializer_range)

    @property
    def hidden_token(self) -> int:
        return self.config.vocab_size

    def hidden(self, coarse: torch.Tensor, labels: torch.Tensor, fine: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised last hidden states [B, T, dim] of the grid positions: what the output head reads.
        Sampling within clusters turns them into the logits of a cluster's members only (`member_logits`).
        fine [B, T]: the revealed fine tokens, `hidden_token` where none is (None: none is); refiners with
        fine_inputs only."""
        self.check_length(coarse.shape[1])
        extra = None
        if self.fine_embeddings is not None:
            fine = torch.full_like(coarse, self.hidden_token) if fine is None else fine
            extra = self.fine_embeddings(fine)
        elif fine is not None:
            raise ValueError("this refiner reads no fine tokens (trained without fine_inputs)")
        return self.norm(self.hidden_states(labels, coarse, extra)[:, 1:])  # without the class-token position

    def member_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The fp32 logits of the fine tokens token_ids [n] at hidden states [..., dim] (from `hidden`): [..., n],
        those columns of the full logits, at the cost of n of the vocab_size output rows. Batched: token_ids [G, n]
        for hidden [G, rows, dim] gives [G, rows, n], group g's rows against its own tokens."""
        rows = self.output.weight.index_select(0, token_ids.flatten()).view(*token_ids.shape, -1)  # row copies
        return (hidden @ rows.mT).float()

    def forward(self, coarse: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None,
                fine: torch.Tensor | None = None):
        """coarse [B, T] coarse labels of a grid in raster order (T <= block_size, normally the whole
        grid), labels [B] class ids (num_classes = null class), fine [B, T] the revealed fine tokens (see `hidden`).

        Returns (logits [B, T, vocab_size] fp32, loss or None): logits[:, t] is the fine token at
        position t given the class and the WHOLE coarse grid. With targets [B, T] (the fine tokens),
        loss is the mean cross-entropy (ignore_index -100) over the positions not revealed. Class dropout applies in
        training mode; so does, with fine_inputs, revealing a random share of the targets (`reveal_share`).
        """
        if self.training and self.fine_embeddings is not None and targets is not None and fine is None:
            fine = torch.where(random_reveal(coarse.shape, coarse.device), targets, self.hidden_token)
        if fine is not None and targets is not None:
            targets = torch.where(fine == self.hidden_token, targets, -100)  # score the hidden positions only
        return self.logits_and_loss(self.hidden(coarse, labels, fine), targets)


def random_reveal(shape: torch.Size, device) -> torch.Tensor:
    """A training mask [B, T] of revealed positions: per grid, ceil(T cos(pi u / 2)) positions stay hidden for
    u ~ U(0, 1) (MaskGIT's cosine schedule, so every step of an S-step sampler is seen), at least one."""
    batch, n = shape
    n_hidden = torch.ceil(n * torch.cos(math.pi / 2 * torch.rand(batch, 1, device=device))).clamp(min=1)
    rank = torch.rand(batch, n, device=device).argsort(1).argsort(1)  # a random order of the positions
    return rank >= n_hidden
