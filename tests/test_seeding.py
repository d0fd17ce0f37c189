"""Training's random streams derive from (seed, use, n) as sampling's from (seed, index): no two seeds share one."""

from types import SimpleNamespace

import pytest
import torch

from ctfgen.data.batches import StepBatchSampler
from ctfgen.sampling.decode import seeded_uniforms
from ctfgen.seeding import DATA_ORDER, VIEWS, derived_generator, derived_seed
from ctfgen.training.train import step_micro_batches


class ViewRecorder:
    """A stage's data that hands back the items and views asked for, in place of (inputs, labels, targets)."""

    def batch(self, items, views):
        return torch.tensor(items), views, views


def views_of(seed: int, step: int) -> torch.Tensor:
    sampler = StepBatchSampler(64, 64, seed=seed)
    cfg = SimpleNamespace(seed=seed, grad_accum=1)
    [(_, views, _)] = step_micro_batches(ViewRecorder(), sampler, step, 2, cfg, torch.device("cpu"))
    return views


def test_seed_0_at_step_7919_draws_other_views_than_seed_1_at_step_0():
    """seed * 7919 + step gave both the same generator; (seed, step) gives each its own."""
    assert not torch.equal(views_of(0, 7919), views_of(1, 0))
    assert torch.equal(views_of(3, 5), views_of(3, 5))  # and a step draws the same views again (resuming)


def test_seed_0_in_epoch_100003_visits_another_order_than_seed_1_in_epoch_0():
    """seed * 100_003 + epoch gave both the same permutation."""
    one_step_epochs = [StepBatchSampler(64, 64, seed=seed) for seed in (0, 1)]
    assert not torch.equal(one_step_epochs[0].global_indices(100_003), one_step_epochs[1].global_indices(0))


def test_derived_seeds_draw_apart_by_seed_use_and_n():
    seeds = {derived_seed(seed, use, n)
             for seed in (0, 1, 2**32 - 1) for use in (DATA_ORDER, VIEWS) for n in (0, 1, 7919)}
    assert len(seeds) == 18
    # sampling's rule, (seed, index), is the same function
    expected = torch.rand(2, 5, generator=derived_generator(4, 9), dtype=torch.float64)
    assert torch.equal(seeded_uniforms([(4, 9)], 5)[0], expected)
    with pytest.raises(ValueError, match="0 .. 2\\*\\*32 - 1"):
        derived_seed(0, VIEWS, 2**32)  # would spill into a fourth word
