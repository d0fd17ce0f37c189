import math

import pytest
import torch
import torch.nn as nn

from ctfgen.errors import CtfgenError
from ctfgen.models import (
    GPT,
    GPT_PRESETS,
    Refiner,
    gpt_config,
    gpt_from_llamagen,
    load_llamagen_state_dict,
    refiner_config,
)
from ctfgen.models.blocks import RMSNorm, apply_rotary_emb, precompute_freqs_cis_2d
from ctfgen.models.config import find_multiple


def randomize(model: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Random weights everywhere (the output layer starts at zero, which would hide everything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(gpt_config("GPT-tiny", 37, 16, 5, **overrides))).eval()


def llamagen_c2i_names_and_shapes(vocab: int, n_classes: int, dim: int, n_layer: int, hidden: int) -> dict:
    """The state dict of LlamaGen's class-conditional GPT, spelled out from its public code."""
    shapes = {"cls_embedding.embedding_table.weight": (n_classes + 1, dim),
              "tok_embeddings.weight": (vocab, dim)}
    for i in range(n_layer):
        shapes |= {f"layers.{i}.attention.wqkv.weight": (3 * dim, dim),
                   f"layers.{i}.attention.wo.weight": (dim, dim),
                   f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
                   f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                   f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
                   f"layers.{i}.attention_norm.weight": (dim,),
                   f"layers.{i}.ffn_norm.weight": (dim,)}
    shapes |= {"norm.weight": (dim,), "output.weight": (vocab, dim)}
    return shapes


@pytest.mark.slow
def test_llamagen_gpt_b_state_dict_loads_strict(tmp_path):
    shapes = llamagen_c2i_names_and_shapes(16384, 1000, 768, 12, hidden=2048)  # int(2*4*768/3) = 2048
    sd = {k: torch.full(s, 0.5, dtype=torch.bfloat16) for k, s in shapes.items()}
    torch.save({"model": sd, "steps": 1000}, tmp_path / "c2i_B_256.pt")
    sd["freqs_cis"] = torch.zeros(257, 32, 2)  # some files carry the RoPE table
    torch.save({"model": sd}, tmp_path / "with_freqs.pt")
    del sd

    model = gpt_from_llamagen(tmp_path / "c2i_B_256.pt", "GPT-B", block_size=256)
    assert (model.config.vocab_size, model.config.num_classes) == (16384, 1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes  # no freqs_cis, no caches
    assert torch.all(model.output.weight == 0.5)
    for name in ("c2i_B_256.pt", "with_freqs.pt"):
        loaded = torch.load(tmp_path / name, map_location="cpu", weights_only=True)["model"]
        model.load_state_dict(loaded, strict=True)
        del loaded
    assert set(load_llamagen_state_dict(tmp_path / "with_freqs.pt")) == set(shapes)
    with pytest.raises(CtfgenError, match="GPT-M"):
        gpt_from_llamagen(tmp_path / "c2i_B_256.pt", "GPT-M")


def test_llamagen_bad_files(tmp_path):
    with pytest.raises(CtfgenError, match="does not exist"):
        load_llamagen_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CtfgenError, match="cannot read"):
        load_llamagen_state_dict(tmp_path / "junk.pt")


def count(config) -> int:
    with torch.device("meta"):
        return GPT(config).num_params()


def test_parameter_counts():
    n_16k = count(gpt_config("GPT-B", 16384, 256, 1000))
    n_512 = count(gpt_config("GPT-B", 512, 256, 1000))
    print(f"GPT-B V=16384: {n_16k}, V=512: {n_512}")
    assert 110e6 <= n_16k <= 112.5e6  # LlamaGen: 111M
    assert 86e6 <= n_512 <= 88e6
    assert n_16k - n_512 == 2 * (16384 - 512) * 768  # input embedding + output layer
    assert count(gpt_config("GPT-L", 16384, 256, 1000)) == pytest.approx(343e6, rel=0.01)
    assert count(gpt_config("GPT-XL", 16384, 256, 1000)) == pytest.approx(775e6, rel=0.01)
    assert count(gpt_config("GPT-XXL", 16384, 256, 1000)) == pytest.approx(1.4e9, rel=0.02)


def test_presets_and_config_checks():
    shapes = {k: (c.n_layer, c.n_head, c.dim) for k, c in GPT_PRESETS.items()}
    assert shapes["GPT-B"] == (12, 12, 768) and shapes["GPT-L"] == (24, 16, 1024)
    assert shapes["GPT-XL"] == (36, 20, 1280) and shapes["GPT-XXL"] == (48, 24, 1536)
    assert shapes["GPT-S"] == (6, 4, 256) and shapes["GPT-M"] == (8, 6, 384) and shapes["GPT-tiny"] == (2, 2, 64)
    assert shapes["GPT-XS"] == (2, 4, 256)
    c = GPT_PRESETS["GPT-B"]
    assert (c.token_dropout_p, c.resid_dropout_p, c.ffn_dropout_p, c.attn_dropout_p, c.drop_path_rate,
            c.class_dropout_prob, c.initializer_range, c.rope_base, c.norm_eps) == \
           (0.1, 0.1, 0.1, 0.0, 0.0, 0.1, 0.02, 10000, 1e-5)
    with pytest.raises(CtfgenError, match="square"):
        gpt_config("GPT-tiny", 10, 15, 2)
    with pytest.raises(CtfgenError, match="unknown model preset"):
        gpt_config("GPT-Q", 10, 16, 2)
    with pytest.raises(CtfgenError, match="bad model option"):
        gpt_config("GPT-tiny", 10, 16, 2, n_layers=3)


def test_init_and_drop_path_schedule():
    model = GPT(gpt_config("GPT-tiny", 37, 16, 5, n_layer=3, drop_path_rate=0.2))
    assert torch.all(model.output.weight == 0)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert isinstance(model.layers[0].drop_path, nn.Identity)
    assert [round(layer.drop_path.p, 6) for layer in model.layers[1:]] == [0.1, 0.2]


def test_ffn_hidden_size_rule():
    for preset, expected in (("GPT-B", 2048), ("GPT-L", 2816), ("GPT-XL", 3584), ("GPT-S", 768), ("GPT-tiny", 256)):
        dim = GPT_PRESETS[preset].dim
        assert find_multiple(int(2 * 4 * dim / 3), 256) == expected
        model_cfg = gpt_config(preset, 8, 16, 2)
        assert model_cfg.ffn_hidden_dim == expected
    model = GPT(gpt_config("GPT-S", 8, 16, 2))
    assert tuple(model.layers[0].feed_forward.w1.weight.shape) == (768, 256)
    assert tuple(model.layers[0].feed_forward.w2.weight.shape) == (256, 768)


def test_rmsnorm_in_fp32():
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(3, 5, 64) * 3
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        xf = xl.float()
        expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
        out = norm(xl)
        assert out.dtype == torch.float32  # low-precision activations times the fp32 weight
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    big = torch.full((2, 64), 300.0, dtype=torch.float16)  # x*x overflows fp16, not fp32
    assert torch.isfinite(norm(big)).all()


def reference_rope(x: torch.Tensor, grid: int, base: float = 10000.0) -> torch.Tensor:
    """Straightforward 2-D RoPE in complex float64: x [S, D] for the sequence [cls] + grid tokens.
    Pairs (2i, 2i+1) are complex numbers; the first D/4 pairs turn with the row, the rest with the
    column, at frequencies base**(-2j / (D/2)); the class token comes out as zeros."""
    s, d = x.shape
    half, quarter = d // 2, d // 4
    z = torch.complex(x[:, 0::2].double(), x[:, 1::2].double())  # [S, D/2]
    out = torch.zeros_like(z)
    for pos in range(1, s):
        row, col = divmod(pos - 1, grid)
        for p in range(half):
            j, idx = (p, row) if p < quarter else (p - quarter, col)
            angle = idx * base ** (-(2 * j) / half)
            out[pos, p] = z[pos, p] * complex(math.cos(angle), math.sin(angle))
    return torch.stack([out.real, out.imag], dim=-1).flatten(1)


def test_rope_matches_straightforward_reference():
    grid, head_dim = 4, 16
    table = precompute_freqs_cis_2d(grid, head_dim, 10000.0)
    assert table.shape == (1 + grid * grid, head_dim // 2, 2) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)  # cos = sin = 0 for the class token, not the identity
    x = torch.randn(2, 1 + grid * grid, 3, head_dim)  # [B, S, H, D]
    out = apply_rotary_emb(x, table)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(out[b, :, h].double(), reference_rope(x[b, :, h], grid), atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, 0] == 0)  # the class token's q / k
    # bf16 input: computed in fp32, returned in bf16
    out16 = apply_rotary_emb(x.bfloat16(), table)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16, apply_rotary_emb(x.bfloat16().float(), table).bfloat16(), rtol=0, atol=0)


def test_model_rope_table_stays_fp32():
    model = GPT(gpt_config("GPT-tiny", 37, 16, 5))
    assert "freqs_cis" not in str(list(model.state_dict()))
    torch.testing.assert_close(model.rope.freqs_cis, precompute_freqs_cis_2d(4, 32, 10000.0), rtol=0, atol=0)
    model.to(torch.bfloat16)
    assert model.rope.freqs_cis.dtype == torch.float32
    torch.testing.assert_close(model.rope.freqs_cis, precompute_freqs_cis_2d(4, 32, 10000.0), rtol=0, atol=0)


def test_gpt_is_causal_and_trains():
    model = tiny_gpt()
    idx, labels = torch.randint(0, 37, (2, 16)), torch.tensor([1, 4])
    with torch.no_grad():
        logits, loss = model(idx, labels)
        assert logits.shape == (2, 16, 37) and logits.dtype == torch.float32 and loss is None
        for t in (0, 5, 14):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 37
            other, _ = model(changed, labels)
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=0)
            assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:])
        changed = idx.clone()
        changed[:, 15] = (changed[:, 15] + 1) % 37  # the last token is never read
        torch.testing.assert_close(model(changed, labels)[0], logits, rtol=0, atol=0)
        assert not torch.allclose(model(idx, torch.tensor([2, 4]))[0][0, 0], logits[0, 0])  # the class matters
    model.train()
    _, loss = model(idx, labels, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and model.tok_embeddings.weight.grad is not None
    with pytest.raises(ValueError):
        model(torch.randint(0, 37, (2, 17)), labels)


def test_refiner_is_bidirectional_and_trains():
    torch.manual_seed(0)
    config = refiner_config("GPT-tiny", coarse_vocab_size=7, vocab_size=37, block_size=16, num_classes=5)
    model = randomize(Refiner(config)).eval()
    assert tuple(model.tok_embeddings.weight.shape) == (7, 64) and tuple(model.output.weight.shape) == (37, 64)
    assert type(model.layers[0]) is type(GPT(gpt_config("GPT-tiny", 8, 16, 2)).layers[0])
    coarse, labels = torch.randint(0, 7, (2, 16)), torch.tensor([0, 3])
    with torch.no_grad():
        logits, _ = model(coarse, labels)
        assert logits.shape == (2, 16, 37)
        changed = coarse.clone()
        changed[:, 15] = (changed[:, 15] + 1) % 7
        other, _ = model(changed, labels)
        assert not torch.allclose(other[:, 0], logits[:, 0])  # a late token changes the first position
    model.train()
    fine = torch.randint(0, 37, (2, 16))
    _, loss = model(coarse, labels, targets=fine)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("prefix_only", [False, True])
def test_cached_decoding_matches_full_forward(prefix_only):
    model = tiny_gpt()
    batch, block = 3, model.config.block_size
    idx, labels = torch.randint(0, 37, (batch, block)), torch.tensor([0, 2, 5])  # 5 = the null class
    with torch.no_grad():
        full, _ = model(idx, labels)
        model.setup_caches(max_batch_size=4)  # a larger cache than the batch is fine
        assert model.layers[0].attention.kv_cache.k_cache.shape == (4, 2, 24, 32)  # 1 + 16 rounded up to 8
        assert not any("cache" in k or "mask" in k for k in model.state_dict())
        steps = [model.prefill(labels)]
        for t in range(block - 1):
            steps.append(model.decode_step(idx[:, t], torch.tensor([t + 1]), kv_len=t + 2 if prefix_only else None))
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=0)
        # prefill with a prefix of image tokens, then continue
        model.setup_caches(max_batch_size=batch)
        torch.testing.assert_close(model.prefill(labels, idx[:, :6]), full[:, 6], atol=1e-4, rtol=0)
        torch.testing.assert_close(model.decode_step(idx[:, 6:7], torch.tensor([7])), full[:, 7], atol=1e-4, rtol=0)
        model.clear_caches()
        with pytest.raises(RuntimeError, match="setup_caches"):
            model.prefill(labels)


def test_save_and_from_pretrained_fp16(tmp_path):
    import os
    import stat

    model = tiny_gpt()
    umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "gpt", dtype="fp16", extra={"note": "x"})
    finally:
        os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # shipped files are readable by everyone
        assert stat.S_IMODE((tmp_path / "gpt" / name).stat().st_mode) == 0o644, name
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert loaded.config == model.config and not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=k)
    with pytest.raises(CtfgenError, match="'gpt' checkpoint, not a 'refiner'"):
        Refiner.from_pretrained(tmp_path / "gpt")

    refiner = Refiner(refiner_config("GPT-tiny", 7, 37, 16, 5))
    refiner.save_pretrained(tmp_path / "refiner", dtype="fp16")
    loaded = Refiner.from_pretrained(tmp_path / "refiner")
    assert loaded.config == refiner.config and loaded.config.coarse_vocab_size == 7


@pytest.mark.parametrize("cls", [GPT, Refiner])
def test_class_dropout(cls):
    config = (gpt_config("GPT-tiny", 37, 16, 5, class_dropout_prob=1.0) if cls is GPT
              else refiner_config("GPT-tiny", 7, 37, 16, 5, class_dropout_prob=1.0))
    model = cls(config)
    seen = []
    model.cls_embedding.embedding_table.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    labels, tokens = torch.tensor([0, 1, 2, 3]), torch.randint(0, 7, (4, 16))
    model.train()
    model(tokens, labels)
    assert torch.all(seen[-1] == config.null_class) and config.null_class == 5
    model.eval()
    model(tokens, labels)
    assert torch.equal(seen[-1], labels)
