"""Deterministic data order that depends only on (seed, step): resuming needs no sampler state.

Epoch e visits a permutation drawn from a generator seeded from (seed, e); each rank takes its share of every global
batch, so one process with batch B and N processes with batch B/N see the same images per step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ctfgen.errors import CtfgenError
from ctfgen.seeding import DATA_ORDER, derived_generator


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, n_items: int, global_batch: int, *, seed: int = 0, start_step: int = 0,
                 end_step: int | None = None, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise CtfgenError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if n_items < global_batch:
            raise CtfgenError(f"the dataset has {n_items} items, fewer than one batch of {global_batch}")
        self.n_items, self.global_batch, self.seed = n_items, global_batch, seed
        self.start_step, self.end_step, self.rank, self.world_size = start_step, end_step, rank, world_size
        self.steps_per_epoch = n_items // global_batch  # the last partial batch of an epoch is dropped
        self._epoch, self._perm = -1, None

    def global_indices(self, step: int) -> torch.Tensor:
        """The whole batch of `step`, over all processes."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = derived_generator(self.seed, DATA_ORDER, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_items, generator=generator)
        return self._perm[position * self.global_batch:(position + 1) * self.global_batch]

    def local_slice(self) -> slice:
        """This process's share of a global batch."""
        local = self.global_batch // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def indices(self, step: int) -> list[int]:
        return self.global_indices(step)[self.local_slice()].tolist()

    def __iter__(self):
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            yield self.indices(step)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.end_step - self.start_step)
