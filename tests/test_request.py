"""The sampling request: one type, checked once, its labels and seeds expanded in one place; and the seed range."""

import numpy as np
import pytest
import torch

from ctfgen.errors import CtfgenError
from ctfgen.sampling.decode import image_seeds, request_seed, seeded_uniforms
from ctfgen.sampling.params import SamplingParams
from ctfgen.sampling.request import SamplingRequest, merged
from ctfgen.validation import MAX_SEED
from test_pipeline import pipe  # noqa: F401 (the tiny pipeline's fixture)


def test_seeds_are_32_bit_and_every_pair_draws_its_own():
    """numpy's SeedSequence reads (seed, index) as the 32-bit words [seed, index]: within 0 .. 2**32 - 1 every pair
    draws numbers of its own, whereas a larger seed's second word runs into the index (seed 2**32, image 0 would
    draw what seed 0, image 1 draws); so larger seeds are refused, and drawn seeds stay in range."""
    edges = [(0, 0), (0, 1), (1, 0), (1, 1), (MAX_SEED, 0), (0, MAX_SEED), (MAX_SEED, MAX_SEED), (MAX_SEED - 1, 1)]
    rows = seeded_uniforms(edges, 8).flatten(1)
    assert len({tuple(row.tolist()) for row in rows}) == len(edges)
    same = [np.random.SeedSequence(words).generate_state(1, np.uint64) for words in ([2**32, 0], [0, 1])]
    assert same[0] == same[1]  # what the range rules out
    for seed in (2**32, 2**70, -1):
        with pytest.raises(CtfgenError, match=f"seed must be between 0 and 4294967295, got {seed}"):
            image_seeds(seed, 1)
        with pytest.raises(CtfgenError, match="seed must be between 0 and 4294967295"):
            SamplingRequest([0], seed=seed)
    with pytest.raises(CtfgenError, match="image index must be between 0 and 4294967295"):
        SamplingRequest([0], seed=[(0, 2**32)])
    drawn = [request_seed(torch.Generator().manual_seed(s)) for s in range(64)]
    assert all(0 <= d <= MAX_SEED for d in drawn) and max(drawn) >= 2**31  # over the whole range, not beyond


def test_a_request_names_its_classes_and_expands_its_labels_once(pipe):  # noqa: F811
    request = SamplingRequest(["Sneaker", 2.0], per_class=2, seed=5).check(pipe)
    assert request.classes == (7, 2) and request.count == 4 and request.labels == (7, 7, 2, 2)
    assert request.image_seeds == ((5, 0), (5, 1), (5, 2), (5, 3))
    part = request.images(range(1, 3))
    assert (part.labels, part.image_seeds) == ((7, 2), ((5, 1), (5, 2)))
    other = SamplingRequest([0], seed=9)
    both = merged([request, other])
    assert both.labels == (7, 7, 2, 2, 0) and both.image_seeds == request.image_seeds + ((9, 0),)
    with pytest.raises(CtfgenError, match="same settings"):
        merged([request, SamplingRequest([0], mode="baseline")])
    with pytest.raises(CtfgenError, match="class id 10 is out of range; this model has classes 0..9"):
        SamplingRequest([10]).check(pipe)
    with pytest.raises(CtfgenError, match="stage 1: top_k must be between 0 .* 8"):
        SamplingRequest([0], sampling=SamplingParams(top_k=9)).check(pipe)


def test_a_request_gives_the_same_images_whole_in_parts_or_as_a_call(pipe):  # noqa: F811
    """In float64 (no near-ties flipped by batch shapes): `sample(request)`, the call with the same arguments, and
    the request's images sampled part by part (as torchrun's processes and the web batcher do) agree exactly."""
    exact = pipe.copy(torch.float64)
    request = SamplingRequest([3, "Bag"], per_class=3, seed=11, sampling=SamplingParams(cfg_scale=2.0, top_k=4))
    whole = exact.sample(request, output_type="pt")
    call = exact([3, "Bag"], per_class=3, seed=11, sampling=SamplingParams(cfg_scale=2.0, top_k=4), output_type="pt")
    checked = request.check(exact)
    parts = [exact.sample(checked.images(range(lo, min(lo + 4, 6))), output_type="pt") for lo in (0, 4)]
    for out in (call, *parts):
        assert out.labels.dtype == torch.long
    assert torch.equal(whole.tokens, call.tokens) and torch.equal(whole.images, call.images)
    assert torch.equal(whole.tokens, torch.cat([p.tokens for p in parts]))
    assert whole.labels.tolist() == [3, 3, 3, 8, 8, 8]
