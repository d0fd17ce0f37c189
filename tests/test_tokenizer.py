import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import send_signal_at_step
from ctfgen.checkpoint import load_weights
from ctfgen.errors import CtfgenError
from ctfgen.tokenizer import train as train_module
from ctfgen.tokenizer.model import VQ_PRESETS, AttnBlock, VQModel, count_parameters, nearest_codewords
from ctfgen.tokenizer.train import TokenizerTrainConfig, train_tokenizer


def llamagen_vq16_shapes() -> dict[str, tuple]:
    """Names and shapes of LlamaGen's vq_ds16_c2i.pt state dict, spelled out from its layout:
    ch 128, ch_mult [1,1,2,2,4], 2 res blocks per encoder level and 3 per decoder level,
    attention after every res block of the lowest resolution, mid = res/attn/res."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    mult = [1, 1, 2, 2, 4]
    conv("encoder.conv_in", 3, 128, 3)
    cin = 128
    for level, m in enumerate(mult):
        for i in range(2):
            res(f"encoder.conv_blocks.{level}.res.{i}", cin, 128 * m)
            cin = 128 * m
            if level == 4:
                attn(f"encoder.conv_blocks.{level}.attn.{i}", cin)
        if level != 4:
            conv(f"encoder.conv_blocks.{level}.downsample.conv", cin, cin, 3)
    for side in ("encoder", "decoder"):
        res(f"{side}.mid.0", 512, 512), attn(f"{side}.mid.1", 512), res(f"{side}.mid.2", 512, 512)
    norm("encoder.norm_out", 512), conv("encoder.conv_out", 512, 256, 3)
    conv("decoder.conv_in", 256, 512, 3)
    cin = 512
    for j, level in enumerate(reversed(range(5))):
        for i in range(3):
            res(f"decoder.conv_blocks.{j}.res.{i}", cin, 128 * mult[level])
            cin = 128 * mult[level]
            if level == 4:
                attn(f"decoder.conv_blocks.{j}.attn.{i}", cin)
        if level != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", 128), conv("decoder.conv_out", 128, 3, 3)
    shapes["quantize.embedding.weight"] = (16384, 8)
    shapes["quantize.codebook_used"] = (65536,)
    conv("quant_conv", 256, 8, 1), conv("post_quant_conv", 8, 256, 1)
    return shapes


@pytest.mark.slow
def test_llamagen_vq16_state_dict_loads_strict(tmp_path):
    shapes = llamagen_vq16_shapes()
    state = {name: torch.randn(shape) for name, shape in shapes.items()}
    torch.save({"model": state}, tmp_path / "vq_ds16_c2i.pt")
    released = torch.load(tmp_path / "vq_ds16_c2i.pt", weights_only=True)["model"]
    model = VQModel(VQ_PRESETS["VQ-16"])
    model.load_state_dict(released, strict=True)
    n_params = sum(torch.Size(s).numel() for name, s in shapes.items() if name != "quantize.codebook_used")
    assert count_parameters(model) == n_params
    assert 71_000_000 < n_params < 73_000_000  # LlamaGen reports 72M for VQ-16


def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 4, 4)
    h = block.norm(x)
    q, k, v = (p(h).flatten(2) for p in (block.q, block.k, block.v))  # [b, c, hw]
    w = torch.softmax(q.transpose(1, 2) @ k * 64**-0.5, dim=2)  # [b, hw(q), hw(k)]
    expected = x + block.proj_out((v @ w.transpose(1, 2)).view_as(x))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_lookup_normalises_latents_and_codewords():
    torch.manual_seed(0)
    model = VQModel(VQ_PRESETS["VQ-tiny"]).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(torch.rand(64, 1) * 10)  # unnormalised stored codewords
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    z = F.normalize(model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1), dim=-1)
    e = F.normalize(model.quantize.embedding.weight, dim=-1)
    assert torch.equal(codes, torch.cdist(z.reshape(-1, 4), e).argmin(1).view(3, 8, 8))
    decoded = model.decode(codes)
    expected = model.decoder(model.post_quant_conv(e[codes].permute(0, 3, 1, 2)))
    torch.testing.assert_close(decoded, expected)
    torch.testing.assert_close(model.codebook, e)


def test_nearest_codewords_in_chunks_is_the_nearest_of_all():
    """The chunked search equals the argmin over the whole distance matrix, for codewords of unequal lengths (their
    squared norms count) and a last chunk shorter than the others; float64, so no near-tie decides it."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1000, 8, generator=generator, dtype=torch.float64)
    lengths = torch.rand(3000, 1, generator=generator, dtype=torch.float64) * 3
    codewords = torch.randn(3000, 8, generator=generator, dtype=torch.float64) * lengths
    expected = torch.cdist(latents, codewords).argmin(1)
    assert torch.equal(nearest_codewords(latents, codewords), expected)
    assert torch.equal(nearest_codewords(latents, codewords, rows=7), expected)


def test_fmnist_preset_shapes_and_roundtrip(tmp_path):
    model = VQModel(VQ_PRESETS["VQ-fmnist"]).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 4096
    assert model.decode(codes).shape == (2, 3, 32, 32)
    model.save_pretrained(tmp_path / "tok", dtype="fp16")
    loaded = VQModel.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name].half().float())


def _train(out, data_dir, **overrides):
    args = dict(out=str(out), model="VQ-tiny", data_dir=str(data_dir), steps=4, batch_size=32, lr=1e-3,
                warmup_steps=2, restart_every=2, ckpt_every=3, log_every=1, progress=False)
    return train_tokenizer(TokenizerTrainConfig(**(args | overrides)))


def image_folder(root, n=40):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


@pytest.mark.parametrize("restarts", [dict(), dict(codebook_size=1024, restart_every=1),
                                      dict(codebook_size=1024, restart_every=3), dict(data="folder")])
def test_sigterm_checkpoint_and_resume_match_uninterrupted_run(tmp_path, fake_fmnist, monkeypatch, restarts):
    """Also with dead codewords restarted after the resume (1024 codes: most are dead), from the usage counted before
    the stop (restart_every 3: the window spans the stop at step 2), and on an image folder, whose random flips come
    from the random state the checkpoint keeps."""
    if restarts.get("data") == "folder":
        restarts = dict(data=str(image_folder(tmp_path / "images")), image_size=16, batch_size=8)
    _train(tmp_path / "straight", fake_fmnist, **restarts)

    learning_rate = send_signal_at_step(monkeypatch, train_module, signal.SIGTERM)
    stopped = _train(tmp_path / "split", fake_fmnist, **restarts)
    assert stopped["step"] == 2
    assert json.loads((tmp_path / "split/checkpoint/config.json").read_text())["step"] == 2
    monkeypatch.setattr(train_module, "learning_rate", learning_rate)
    resumed = _train(tmp_path / "split", fake_fmnist, resume=True, **restarts)
    assert resumed["step"] == 4

    straight, split = load_weights(tmp_path / "straight/checkpoint"), load_weights(tmp_path / "split/checkpoint")
    assert straight.keys() == split.keys()
    for name in straight:
        if name != "quantize.codebook_used":
            assert torch.equal(straight[name], split[name]), name
    metrics = [json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_the_command_says_a_stopped_training_stopped(tmp_path, fake_fmnist, monkeypatch, capsys):
    """`ctfgen tokenizer train` stopped by SIGTERM: the checkpoint, then one line saying where it stopped and how to
    go on, and exit status 130 (not 0, which a batch system would take for a finished run)."""
    from ctfgen import cli

    learning_rate = send_signal_at_step(monkeypatch, train_module, signal.SIGTERM)
    args = ["tokenizer", "train", "--out", str(tmp_path / "run"), "--model", "VQ-tiny", "--data-dir", str(fake_fmnist),
            "--steps", "4", "--batch-size", "32", "--no-progress"]
    assert cli.main(args) == 130
    out, err = capsys.readouterr()
    assert "(step 2)" in out
    assert err.strip() == ("ctfgen: interrupted: the tokenizer's training stopped at step 2 of 4, checkpointed; "
                           "the same command with --resume continues it")
    monkeypatch.setattr(train_module, "learning_rate", learning_rate)
    assert cli.main([*args, "--resume"]) == 0


def test_training_refuses_to_overwrite_a_run(tmp_path, fake_fmnist):
    _train(tmp_path / "run", fake_fmnist, steps=1)
    with pytest.raises(CtfgenError, match="--resume"):
        _train(tmp_path / "run", fake_fmnist, steps=1)


def test_dead_codes_are_restarted(tmp_path, fake_fmnist):
    result = _train(tmp_path / "run", fake_fmnist, steps=2, restart_every=2, codebook_size=1024)
    assert result["restarted"] > 0  # an untrained encoder maps everything to a few of 1024 codes
    assert result["restarted"] == round((1 - result["codebook_usage_window"]) * 1024)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, fake_fmnist):
    common = ["tokenizer", "train", "--model", "VQ-tiny", "--data-dir", str(fake_fmnist), "--steps", "3",
              "--batch-size", "32", "--restart-every", "0", "--warmup-steps", "1", "--log-every", "1", "--no-progress",
              "--precision", "fp32"]  # the equivalence is about the math: bf16 autocast (on AVX-512 CPUs) rounds
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ctfgen.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ctfgen.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    a, b = load_weights(tmp_path / "one/checkpoint"), load_weights(tmp_path / "two/checkpoint")
    for name in a:
        if name == "quantize.codebook_used":
            continue
        # Adam divides each gradient by its own running size, so an element whose gradient is ~zero (biases in
        # front of a GroupNorm, the odd weight) takes a step of rounding noise, and the two runs' sums round
        # differently: such elements may differ by a fraction of one lr step (1e-3). Unsynchronised gradients or
        # other data move weights by whole steps.
        atol = 1e-4 if a[name].dim() > 1 else 2e-4
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    losses = [[json.loads(line)["rec_mse"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-6, rtol=1e-5)
    moved = load_weights(tmp_path / "one/checkpoint")["decoder.conv_out.weight"]
    assert not torch.equal(moved, VQModel(VQ_PRESETS["VQ-tiny"]).state_dict()["decoder.conv_out.weight"])
