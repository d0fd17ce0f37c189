"""Random streams derived from whole numbers, one rule for sampling and training.

numpy's SeedSequence hashes a list of 32-bit words into a 64-bit seed: (seed, index) for image `index` of a sampling
request, (seed, use, n) for training (`use` one of the constants below, n the step, epoch or rank). Lists of one
length that differ give different seeds, where arithmetic such as seed * 7919 + step collides (seed 0 at step 7919
would draw what seed 1 draws at step 0).
"""

from __future__ import annotations

import numpy as np
import torch

# What a training stream is for: its second word, so that the streams of one (seed, n) draw apart.
DATA_ORDER, VIEWS, DROPOUT, CODE_RESTARTS = 1, 2, 3, 4


def derived_seed(*words: int) -> int:
    """A 64-bit seed from whole numbers 0 .. 2**32 - 1. Each number is one word: a larger one would spill into the
    next (and a shorter list reads as padded with zeros), so each use keeps its list's length fixed."""
    if not all(0 <= w < 2**32 for w in words):
        raise ValueError(f"seed words must be 0 .. 2**32 - 1, got {words}")
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def derived_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from `words` (see `derived_seed`)."""
    return torch.Generator().manual_seed(derived_seed(*words))
