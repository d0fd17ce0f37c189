import numpy as np
import pytest
import torch

from ctfgen.backends.decoding import DECODE_BACKEND_ENV, DECODE_BACKENDS, compile_decoding, decoding_compiled
from ctfgen.clustering import cluster_codebook
from ctfgen.errors import CtfgenError
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner, refiner_config
from ctfgen.sampling.decode import (
    filter_logits,
    generate,
    image_uniforms,
    request_seed,
    sample_categorical,
    sample_tokens,
)
from ctfgen.sampling.params import SamplingParams
from ctfgen.sampling.refine import member_table, refine, sample_within_clusters
from reference import generate_uncached, sample_within_clusters_loop


def random_gpt(vocab=32, block=16, seed=0):
    torch.manual_seed(seed)
    model = GPT(gpt_config("GPT-tiny", vocab_size=vocab, block_size=block, num_classes=10)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # LlamaGen zero-initialises it: all-equal logits
    return model


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_greedy_decoding_equals_uncached(cfg_scale):
    model = random_gpt()
    labels = torch.tensor([0, 3, 7, 9])
    cached = generate(model, labels, SamplingParams(temperature=0, cfg_scale=cfg_scale))
    reference = generate_uncached(model, labels, cfg_scale=cfg_scale)
    assert cached.shape == (4, 16)
    assert torch.equal(cached, reference)
    assert len(torch.unique(cached)) > 3  # not a degenerate constant sequence


def test_same_numbers_same_tokens_other_numbers_other_tokens():
    model = random_gpt()
    labels = torch.arange(8) % 10
    params = SamplingParams(temperature=1.0, top_k=20, cfg_scale=2.0)

    def run(seed):
        return generate(model, labels, params, uniforms=image_uniforms(seed, 0, 8, 16)[:, 0])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_each_image_draws_its_own_numbers():
    """Image i's numbers depend on (seed, i) only: not on where its batch starts or how long it is."""
    whole = image_uniforms(7, 0, 10, 16)
    assert whole.shape == (10, 2, 16) and whole.dtype == torch.float64
    assert torch.equal(torch.cat([image_uniforms(7, 0, 3, 16), image_uniforms(7, 3, 7, 16)]), whole)
    assert not torch.equal(image_uniforms(8, 0, 10, 16), whole)
    assert len(torch.unique(whole[:, 0, 0])) == 10  # images do not share numbers


def test_request_seed_from_an_int_a_generator_or_none():
    assert request_seed(5) == 5
    generator = torch.Generator().manual_seed(0)
    first, second = request_seed(generator), request_seed(generator)
    assert first != second  # a reused generator moves on, as in diffusers
    assert request_seed(torch.Generator().manual_seed(0)) == first
    for bad in (-1, 1.5, "3", float("nan")):
        with pytest.raises(CtfgenError, match="seed"):
            request_seed(bad)


def test_callback_sees_the_tokens_so_far():
    model = random_gpt()
    labels = torch.tensor([1, 2])
    seen = []
    tokens = generate(model, labels, SamplingParams(cfg_scale=2.0), uniforms=torch.rand(2, 16),
                      callback=lambda step, so_far: seen.append((step, so_far.clone())), callback_steps=5)
    assert [step for step, _ in seen] == [5, 10, 15, 16]
    for step, so_far in seen:
        assert torch.equal(so_far, tokens[:, :step])


def test_sample_categorical_follows_the_probabilities_and_never_picks_zeros():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    n = 50000
    uniforms = torch.rand(2, n, generator=torch.Generator().manual_seed(0))
    draws = sample_categorical(probs[:, None].expand(-1, n, -1), uniforms)
    assert draws.shape == (2, n)
    for row, p in zip(draws, probs):
        freq = torch.bincount(row, minlength=6).float() / n
        assert (freq - p).abs().max() < 0.01
        assert freq[p == 0].sum() == 0
    # u * total rounding up to the total (u = 1 stands in for it) still picks a token with p > 0.
    assert sample_categorical(torch.tensor([[0.25, 0.75, 0.0, 0.0]]), torch.ones(1)).item() == 1


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[0] < 0.8 < probs[:2].sum()


def expected_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """What sampling at these settings should draw from, written out from the definitions in float64: softmax of
    logits / temperature over the top_k largest logits (-inf ones never count), then over the fewest most likely
    of those whose probabilities add up to top_p (the one that crosses top_p kept); 0 elsewhere."""
    logits = np.asarray(logits, dtype=np.float64)
    kept = np.isfinite(logits)
    if top_k:
        kept &= logits >= np.sort(logits[kept])[::-1][min(top_k, kept.sum()) - 1]

    def softmax(mask):
        z = np.where(mask, logits / temperature, -np.inf)
        e = np.exp(z - z[mask].max())
        return e / e.sum()

    probs = softmax(kept)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]  # probability of the more likely tokens
    nucleus = np.zeros_like(kept)
    nucleus[order] = before < top_p
    return softmax(kept & nucleus)


def test_expected_probabilities_by_hand():
    """The reference itself, on numbers worked out on paper: logits ln(4), ln(2), ln(1), ln(1) give 1/2, 1/4, 1/8,
    1/8; temperature 1/2 squares the odds (16 : 4 : 1 : 1), temperature 2 takes their square roots; top_k 2 keeps
    2/3, 1/3; top_p 0.7 keeps the two first (1/2 < 0.7 <= 3/4)."""
    logits = np.log([4.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(expected_probabilities(logits), [1 / 2, 1 / 4, 1 / 8, 1 / 8])
    np.testing.assert_allclose(expected_probabilities(logits, temperature=0.5), np.array([16, 4, 1, 1]) / 22)
    odds = np.array([2, 2**0.5, 1, 1])
    np.testing.assert_allclose(expected_probabilities(logits, temperature=2.0), odds / odds.sum())
    np.testing.assert_allclose(expected_probabilities(logits, top_k=2), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(expected_probabilities(logits, top_p=0.7), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(expected_probabilities(logits, top_p=0.5), [1, 0, 0, 0])


def grid_frequencies(logits: torch.Tensor, params: SamplingParams, n: int = 20000) -> np.ndarray:
    """How often `sample_tokens` picks each token of logits [V] at the numbers (j + 1/2) / n, j < n: inverting a
    distribution at them picks token v for n * p(v) of them, give or take one, so these are the sampler's
    probabilities to 1 / n (not a random draw)."""
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = sample_tokens(logits.expand(n, -1), params, grid)
    return (torch.bincount(tokens, minlength=len(logits)).double() / n).numpy()


SETTINGS = [{}, {"temperature": 0.5}, {"temperature": 1.8}, {"top_k": 3}, {"top_p": 0.75},
            {"temperature": 0.7, "top_k": 5, "top_p": 0.8}, {"temperature": 1.6, "top_p": 0.9}]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampling_draws_from_the_tempered_filtered_softmax(settings):
    logits = torch.tensor([2.0, -1.0, 0.5, 1.2, -0.3, 0.0, 0.9, -2.0])
    n = 20000
    expected = expected_probabilities(logits.numpy(), **settings)
    assert np.abs(grid_frequencies(logits, SamplingParams(**settings), n) - expected).max() <= 1 / n + 1e-6
    if settings:  # each setting changes what is drawn
        assert np.abs(expected - expected_probabilities(logits.numpy())).max() > 0.05


def test_stage2_samples_stay_in_their_clusters():
    torch.manual_seed(0)
    coarse_map = cluster_codebook(torch.randn(64, 4), 8, seed=0)
    refiner = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=8, vocab_size=64, block_size=16,
                                     num_classes=10)).eval()
    torch.nn.init.normal_(refiner.output.weight, std=1.0)
    coarse = torch.randint(8, (200, 16))
    labels = torch.randint(10, (200,))
    for kwargs in ({}, {"cfg_scale": 2.0}, {"top_k": 2}, {"top_p": 0.5}, {"temperature": 1.5}):
        fine = refine(refiner, coarse, labels, coarse_map.coarse_of_fine, SamplingParams(**kwargs))
        assert torch.equal(coarse_map.coarse_of_fine[fine], coarse)
    free = refine(refiner, coarse, labels, coarse_map.coarse_of_fine, restrict=False)
    assert not torch.equal(coarse_map.coarse_of_fine[free], coarse)  # the ablation really lifts the restriction


@pytest.mark.parametrize("cfg_scale,settings", [(1.0, {}), (3.0, {}), (1.0, {"temperature": 0.6}),
                                               (3.0, {"temperature": 1.7, "top_k": 3}), (1.0, {"top_p": 0.7})])
def test_stage2_within_cluster_sampling_is_the_masked_full_softmax(cfg_scale, settings):
    """Computing only the members' logits gives what masking all V logits gives: the greedy tokens, and at every
    position the very distribution (the sampler's answers to a fine grid of numbers, not a random draw), tempered
    and filtered among the cluster's members as `expected_probabilities` writes out."""
    torch.manual_seed(1)
    coarse_map = cluster_codebook(torch.randn(64, 4), 8, seed=0)
    refiner = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=8, vocab_size=64, block_size=16,
                                     num_classes=10)).eval()
    torch.nn.init.normal_(refiner.output.weight, std=1.0)
    coarse, labels = torch.randint(8, (50, 16)), torch.randint(10, (50,))
    with torch.no_grad():
        if cfg_scale > 1:
            cond, uncond = refiner(coarse.repeat(2, 1), torch.cat([labels, torch.full_like(labels, 10)]))[0].chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        else:
            logits = refiner(coarse, labels)[0]
    masked = logits.masked_fill(coarse_map.coarse_of_fine[None, None] != coarse[..., None], float("-inf"))
    greedy_params = SamplingParams(temperature=0, cfg_scale=cfg_scale)
    greedy = refine(refiner, coarse, labels, coarse_map.coarse_of_fine, greedy_params)
    assert torch.equal(greedy, masked.argmax(-1))
    # Numbers (j + 1/2) / n, j < n, at every position of the first grid: inverting a distribution at them picks
    # token v for n * p(v) of them, give or take one. So each position's frequencies are its probabilities to 1 / n.
    n = 1000
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None].expand(n, 16)
    tokens = refine(refiner, coarse[:1].expand(n, -1), labels[:1].expand(n), coarse_map.coarse_of_fine,
                    SamplingParams(cfg_scale=cfg_scale, **settings), uniforms=grid)
    freq = torch.stack([torch.bincount(tokens[:, t], minlength=64) for t in range(16)]).double().numpy() / n
    probs = np.stack([expected_probabilities(row, **settings) for row in masked[0].double().numpy()])
    assert np.abs(freq - probs).max() <= 1 / n + 1e-6
    assert freq[probs == 0].sum() == 0


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0}, {"temperature": 1.7}, {"top_k": 3}, {"top_p": 0.6}])
def test_batched_within_cluster_sampling_picks_the_tokens_of_the_loop(kwargs):
    """All clusters in one batched matmul and one sampling call (positions in chunks, clusters padded and masked)
    pick, in float64 and for the same numbers, exactly the tokens of the cluster-by-cluster loop it replaced, however
    the positions are chunked."""
    torch.manual_seed(3)
    coarse_map = cluster_codebook(torch.randn(64, 4), 8, seed=0)
    table, sizes = member_table(coarse_map.coarse_of_fine)
    assert len(set(sizes.tolist())) > 1 and table.shape == (8, int(sizes.max()))  # uneven clusters: padding matters
    for cluster, size in enumerate(sizes.tolist()):
        assert torch.equal(table[cluster, :size], torch.nonzero(coarse_map.coarse_of_fine == cluster).flatten())
    refiner = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=8, vocab_size=64, block_size=16,
                                     num_classes=10)).eval().double()
    torch.nn.init.normal_(refiner.output.weight, std=1.0)
    hidden = torch.randn(5, 16, refiner.config.dim, dtype=torch.float64)
    coarse = torch.randint(1, 8, (5, 16))  # cluster 0 never appears
    uniforms = torch.rand(5, 16, dtype=torch.float64)
    params = SamplingParams(**kwargs)
    loop = sample_within_clusters_loop(refiner, hidden, coarse, coarse_map.coarse_of_fine, params, uniforms)
    assert torch.equal(coarse_map.coarse_of_fine[loop], coarse)
    for chunk in (1, 3, 32, 100):
        batched, log_prob = sample_within_clusters(refiner, hidden, coarse, coarse_map.coarse_of_fine, params,
                                                   uniforms, chunk=chunk)
        assert torch.equal(batched, loop) and log_prob is None, chunk
    # The confidence the S-step sampler ranks by: each pick's log-probability among its cluster's members, under the
    # tempered logits.
    batched, log_prob = sample_within_clusters(refiner, hidden, coarse, coarse_map.coarse_of_fine, params, uniforms,
                                               confidence=True)
    assert torch.equal(batched, loop)
    logits = refiner.output(hidden).float()  # the sampler's logits are fp32
    temperature = params.temperature or 1.0
    for b, t in ((0, 0), (2, 7), (4, 15)):
        members = torch.nonzero(coarse_map.coarse_of_fine == coarse[b, t]).flatten()
        expected = (logits[b, t, members] / temperature).log_softmax(-1)[members.tolist().index(int(loop[b, t]))]
        assert torch.allclose(log_prob[b, t], expected, rtol=1e-4, atol=1e-5), (b, t)


@pytest.mark.slow
@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_compiled_decode_step_gives_the_eager_tokens(backend, monkeypatch):
    monkeypatch.setenv(DECODE_BACKEND_ENV, backend)
    model = random_gpt()
    labels = torch.tensor([0, 3, 7, 9])
    greedy = SamplingParams(temperature=0, cfg_scale=2.0)
    eager = generate(model, labels, greedy)
    compile_decoding(model)
    assert decoding_compiled(model)
    compiled = generate(model, labels, greedy)
    assert torch.equal(compiled, eager)
    assert torch.equal(generate(model, labels[:2], greedy), eager[:2])  # another batch size


def llamagen_greedy_generate(model, labels, cfg_scale: float, cfg_interval: int) -> torch.Tensor:
    """LlamaGen's generate() (autoregressive/models/generate.py), greedy, on ctfgen's GPT without a cache. Its
    prefill samples token 0, guided; `decode_n_tokens` step i samples token i + 1, guided unless
    `cfg_interval > -1 and i > cfg_interval`. Guided logits: uncond + (cond - uncond) * cfg_scale."""
    b = len(labels)
    cond_combined = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    tokens = torch.zeros(b, 0, dtype=torch.long)

    def next_token(cfg_flag: bool) -> torch.Tensor:
        seq = torch.cat([tokens, tokens.new_zeros(b, 1)], dim=1)  # output t predicts token t; the last is unread
        cond_logits, uncond_logits = model(seq.repeat(2, 1), cond_combined)[0][:, -1].chunk(2)
        logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale if cfg_flag else cond_logits
        return logits.argmax(-1, keepdim=True)

    with torch.no_grad():
        tokens = next_token(True)  # prefill
        cfg_flag = True
        for i in range(model.config.block_size - 1):
            if cfg_interval > -1 and i > cfg_interval:
                cfg_flag = False
            tokens = torch.cat([tokens, next_token(cfg_flag)], dim=1)
    return tokens


@pytest.mark.parametrize("cfg_interval", [-1, 0, 3])
def test_cfg_interval_guides_the_tokens_llamagen_guides(cfg_interval):
    """cfg_interval = N guides tokens 0 to N + 1, as LlamaGen's generate() does."""
    model = random_gpt()
    labels = torch.arange(8) % 10

    def ours(n):
        return generate(model, labels, SamplingParams(temperature=0, cfg_scale=4.0, cfg_interval=n))

    assert torch.equal(ours(cfg_interval), llamagen_greedy_generate(model, labels, 4.0, cfg_interval))
    assert not torch.equal(ours(cfg_interval), ours(cfg_interval + 1))  # each guided token counts here
    assert [SamplingParams(cfg_interval=2).guides_token(t) for t in range(5)] == [True, True, True, True, False]


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"top_k": -1}, "top_k must be at least 0"), ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, "top_p"),
    ({"cfg_scale": float("nan")}, "cfg_scale must be a finite"), ({"cfg_scale": 0.5}, "cfg_scale must be >= 1"),
    ({"cfg_interval": -2}, "cfg_interval must be at least -1"), ({"temperature": "1"}, "temperature"),
])
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(CtfgenError, match=message):
        SamplingParams(**kwargs)


def test_sampling_settings_are_normalised():
    params = SamplingParams(top_k=3.0, temperature=1)
    assert params.top_k == 3 and isinstance(params.top_k, int) and isinstance(params.temperature, float)
