"""The decode backends against the pure model: the CPU backend's steps give the model's own logits (the model in
float64 is the reference) and follow every change of the weights; the backend is chosen in one place, the decode loop
asks it, and CTFGEN_DECODE_BACKEND=eager switches the CPU backend off."""

import copy

import pytest
import torch

from ctfgen.backends import cpu_decode
from ctfgen.backends.cpu_decode import PackedDecoder, packed_linear_supported
from ctfgen.backends.decoding import DECODE_BACKEND_ENV, compile_decoding, decode_backend
from ctfgen.backends.eager import EagerDecoder
from ctfgen.errors import CtfgenError
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.sampling.decode import generate
from ctfgen.sampling.params import SamplingParams

needs_onednn = pytest.mark.skipif(not packed_linear_supported(torch.float32), reason="no oneDNN in this torch build")


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


def check_against_pure_model(model: GPT) -> torch.Tensor:
    """The CPU backend's logits against those of the pure model computed in float64; returns them."""
    labels, idx = torch.tensor([0, 2, 5]), torch.tensor([[1, 4, 36], [0, 0, 7], [12, 30, 2]])  # 5: the null class
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        model.setup_caches(max_batch_size=3)
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
