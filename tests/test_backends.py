"""The decode backends against the pure model: the CPU backend's steps give the model's own logits (the model in
float64 is the reference) and follow every change of the weights; the backend is chosen in one place, the decode loop
asks it, and CTFGEN_DECODE_BACKEND=eager switches the CPU backend off."""

import copy

import pytest
import torch

from ctfgen.backends import cpu_attention, cpu_decode
from ctfgen.backends.cpu_decode import PackedDecoder, packed_linear_supported
from ctfgen.backends.decoding import DECODE_BACKEND_ENV, compile_decoding, decode_backend, setup_caches
from ctfgen.backends.eager import EagerDecoder
from ctfgen.errors import CtfgenError
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.sampling.decode import generate
from ctfgen.sampling.params import SamplingParams

needs_onednn = pytest.mark.skipif(not packed_linear_supported(torch.float32), reason="no oneDNN in this torch build")
needs_avx512_bf16 = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                                       reason="the CPU attention kernel needs AVX512-BF16")


def random_gpt(seed: int = 0) -> GPT:
    """GPT-tiny (2 layers, dim 64, V = 37, 4 x 4 grid) with random weights everywhere (the output layer starts at
    zero), in eval mode."""
    torch.manual_seed(seed)
    model = GPT(gpt_config("GPT-tiny", 37, 16, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def step_logits(decoder, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Logits [B, 1 + T, V] of the prefill and T steps fed idx [B, T], each over the filled cache positions only;
    `decoder` is a backend's decoder or the model itself (the same methods)."""
    out = [decoder.prefill(labels)]
    out += [decoder.decode_step(idx[:, t], torch.tensor([t + 1]), kv_len=t + 2) for t in range(idx.shape[1])]
    return torch.stack(out, 1)


def check_against_pure_model(model: GPT, position_major: bool = False) -> torch.Tensor:
    """The CPU backend's logits, on caches of either layout, against those of the pure model computed in float64;
    returns them."""
    labels, idx = torch.tensor([0, 2, 5]), torch.tensor([[1, 4, 36], [0, 0, 7], [12, 30, 2]])  # 5: the null class
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        model.setup_caches(max_batch_size=3, position_major=position_major)
        decoder = decode_backend(model)
        assert isinstance(decoder, PackedDecoder)
        packed = step_logits(decoder, labels, idx)
        reference.setup_caches(max_batch_size=3)
        pure = step_logits(reference, labels, idx)
    torch.testing.assert_close(packed.double(), pure.double(), atol=1e-4, rtol=1e-5)  # pure: fp64, logits in fp32
    return packed


@needs_onednn
def test_cpu_backend_gives_the_pure_models_logits_and_follows_the_weights():
    """Packed copies of the weights never go stale: after a change in place, load_state_dict or a round trip
    through bf16 (new tensors, rounded values) the steps still give the pure model's logits; a deep copy packs its
    own."""
    model = random_gpt()
    before = check_against_pure_model(model)
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(1.5)  # in place
    assert not torch.allclose(check_against_pure_model(model), before)
    model.load_state_dict(random_gpt(seed=3).state_dict())
    check_against_pure_model(model)
    model.to(torch.bfloat16).to(torch.float32)
    check_against_pure_model(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.output.weight.mul_(2)
    check_against_pure_model(twin)
    check_against_pure_model(model)


@needs_onednn
def test_position_major_caches_give_the_same_logits():
    """The layout the attention kernel streams: the CPU backend's few-query attention and the pure model's cache
    writes and attention read it as they read the usual one."""
    model = random_gpt()
    check_against_pure_model(model, position_major=True)
    labels, idx = torch.tensor([1, 5]), torch.tensor([[3, 9, 20, 0], [36, 1, 1, 8]])
    pure = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = {}
        for position_major in (False, True):
            pure.setup_caches(max_batch_size=3, position_major=position_major)  # more rows than decoded
            assert pure.layers[0].attention.kv_cache.k_cache.is_contiguous() != position_major
            logits[position_major] = step_logits(pure, labels, idx)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-12, rtol=0)


def float64_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    scores = q.double() @ keys.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.softmax(-1) @ values.double()


@needs_avx512_bf16
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_the_cpu_attention_kernel_against_float64(head_dim):
    """The C++ kernel (bf16 products summed in fp32) against softmax(q k^T / sqrt(D)) v in float64 of the same bf16
    values, on either cache layout, over a batch slice of the cache, for 1 to all positions."""
    assert cpu_attention.load()
    generator = torch.Generator().manual_seed(head_dim)
    rows, heads, positions = 6, 3, 24
    q = torch.randn(rows - 1, heads, 1, head_dim, generator=generator).to(torch.bfloat16)
    for position_major in (False, True):
        shape = (positions, rows, heads, head_dim) if position_major else (rows, heads, positions, head_dim)
        caches = [3 * torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in "kv"]
        keys, values = [c.permute(1, 2, 0, 3) if position_major else c for c in caches]
        for kv_len in (1, 17, positions):
            k, v = keys[:rows - 1, :, :kv_len], values[:rows - 1, :, :kv_len]
            assert cpu_attention.serves(k)
            out = cpu_attention.decode_attention(q, k, v)
            assert out.dtype == torch.float32 and out.shape == q.shape
            torch.testing.assert_close(out.double(), float64_attention(q, k, v), atol=2e-5, rtol=1e-5)


@needs_onednn
def test_caches_are_position_major_where_the_attention_kernel_serves(monkeypatch):
    """`decoding.setup_caches` lays the caches out for the kernel only for bf16 caches of the CPU backend with the
    kernel loaded; everywhere else the model's own layout."""
    narrow = GPT(gpt_config("GPT-tiny", 37, 16, 5, n_head=4)).eval()  # head_dim 16: too narrow for the kernel
    wide = random_gpt()  # head_dim 32
    layout = lambda m: m.layers[0].attention.kv_cache.position_major  # noqa: E731
    monkeypatch.setattr(cpu_attention, "load", lambda: True)
    with torch.no_grad():
        setup_caches(wide, 4, dtype=torch.bfloat16)
        assert layout(wide)
        setup_caches(wide, 4)  # fp32
        assert not layout(wide)
        setup_caches(narrow, 4, dtype=torch.bfloat16)
        assert not layout(narrow)
        monkeypatch.setenv(DECODE_BACKEND_ENV, "eager")
        setup_caches(wide, 4, dtype=torch.bfloat16)
        assert not layout(wide)
        monkeypatch.setenv(DECODE_BACKEND_ENV, "auto")
        monkeypatch.setattr(cpu_attention, "load", lambda: False)
        setup_caches(wide, 4, dtype=torch.bfloat16)
        assert not layout(wide)
    setup_caches(wide, 4, dtype=torch.bfloat16)  # autograd on: no CPU backend
    assert not layout(wide)


@needs_onednn
@needs_avx512_bf16
def test_bf16_decoding_runs_the_attention_kernel(monkeypatch):
    """generate() in bf16 on this CPU: every one-query step of every layer through the kernel, on position-major
    caches."""
    calls = []

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    kernel = cpu_attention._decode_attention
    monkeypatch.setattr(cpu_attention, "_decode_attention", counted)
    model = random_gpt().to(torch.bfloat16)
    generate(model, torch.tensor([0, 3]), SamplingParams(cfg_scale=2.0))
    assert model.layers[0].attention.kv_cache.position_major
    assert len(calls) == 16 * model.config.n_layer  # 16 tokens: the class token's prefill and 15 steps, one query each


@needs_onednn
@pytest.mark.slow
def test_the_compiled_cpu_step_gives_the_pure_models_logits():
    """The compiled step (attention normalised after the weighted sum, no mask for a step's one query) against the
    pure model in float64, at every position of the grid."""
    model = random_gpt()
    compile_decoding(model)
    labels, idx = torch.tensor([0, 2, 5]), torch.randint(0, 37, (3, 15), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        model.setup_caches(max_batch_size=3)
        decoder = decode_backend(model)
        assert isinstance(decoder, PackedDecoder) and decoder.step is not cpu_decode.packed_step  # compiled
        compiled = step_logits(decoder, labels, idx)
        reference.setup_caches(max_batch_size=3)
        pure = step_logits(reference, labels, idx)
    torch.testing.assert_close(compiled.double(), pure.double(), atol=1e-4, rtol=1e-5)  # pure: fp64, logits fp32


@needs_onednn
def test_the_backend_is_chosen_by_device_mode_dtype_and_the_environment(monkeypatch):
    model = random_gpt()
    model.setup_caches(max_batch_size=2)
    assert isinstance(decode_backend(model), EagerDecoder)  # autograd on
    with torch.no_grad():
        assert isinstance(decode_backend(model), PackedDecoder)
        model.train()
        assert isinstance(decode_backend(model), EagerDecoder)
        model.eval().double()
        assert isinstance(decode_backend(model), EagerDecoder)  # fp64: oneDNN does not serve it
        model.float()
        monkeypatch.setenv(DECODE_BACKEND_ENV, "eager")
        assert isinstance(decode_backend(model), EagerDecoder)
        monkeypatch.setenv(DECODE_BACKEND_ENV, "auto")
        assert isinstance(decode_backend(model), PackedDecoder)
        monkeypatch.setenv(DECODE_BACKEND_ENV, "onednn")
        with pytest.raises(CtfgenError, match=f"{DECODE_BACKEND_ENV}='onednn' is not a decode backend"):
            decode_backend(model)


@needs_onednn
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_the_decode_loop_runs_in_the_chosen_backend(backend, monkeypatch):
    """generate() steps through the CPU backend unless CTFGEN_DECODE_BACKEND=eager; both give the same tokens."""
    calls = []

    def counted_step(*args):
        calls.append(1)
        return packed_step(*args)

    packed_step = cpu_decode.packed_step
    monkeypatch.setattr(cpu_decode, "packed_step", counted_step)
    monkeypatch.setenv(DECODE_BACKEND_ENV, backend)
    model, labels = random_gpt(), torch.tensor([0, 3, 4])
    tokens = generate(model, labels, SamplingParams(temperature=0, cfg_scale=2.0))
    assert len(calls) == (15 if backend == "auto" else 0)  # 16 tokens: a prefill and 15 steps
    monkeypatch.setenv(DECODE_BACKEND_ENV, "eager" if backend == "auto" else "auto")
    assert torch.equal(generate(model, labels, SamplingParams(temperature=0, cfg_scale=2.0)), tokens)
