import pytest
import torch

from ctfgen.clustering import cluster_codebook
from ctfgen.errors import CtfgenError
from ctfgen.models.gpt import GPT, gpt_config
from ctfgen.models.refiner import Refiner, refiner_config
from ctfgen.pipeline import CTFPipeline
from ctfgen.tokenizer.model import VQ_PRESETS, VQConfig, VQModel

TOKENIZER = VQConfig(**(VQ_PRESETS["VQ-tiny"].to_dict() | {"encoder_ch_mult": [1, 1, 1], "decoder_ch_mult": [1, 1, 1]}))


def make_parts(seed=0):
    torch.manual_seed(seed)
    tokenizer = VQModel(TOKENIZER).eval()  # 32x32 -> 8x8 tokens, 64 codes
    coarse_map = cluster_codebook(tokenizer.codebook_weights, 8, seed=0)
    shape = dict(block_size=64, num_classes=10)
    stage1 = GPT(gpt_config("GPT-tiny", vocab_size=8, **shape)).eval()
    stage2 = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=8, vocab_size=64, **shape)).eval()
    baseline = GPT(gpt_config("GPT-tiny", vocab_size=64, **shape)).eval()
    for model in (stage1, stage2, baseline):
        torch.nn.init.normal_(model.output.weight, std=0.5)
    return dict(tokenizer=tokenizer, coarse_map=coarse_map, stage1=stage1, stage2=stage2, baseline=baseline)


@pytest.fixture(scope="module")
def pipe():
    return CTFPipeline(**make_parts())


def test_images_seeds_and_preview(pipe):
    out = pipe([0, 3, 7], seed=1, preview=True)
    assert len(out.images) == 3 and out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    assert len(out.previews) == 3
    assert torch.equal(out.pixels, pipe([0, 3, 7], seed=1).pixels)
    assert not torch.equal(out.pixels, pipe([0, 3, 7], seed=2).pixels)
    assert pipe([1, 2], mode="baseline", seed=0).pixels.shape == (2, 3, 32, 32)


def test_save_and_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe", dtype=None)
    loaded = CTFPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded([4, 5], seed=3).pixels, pipe([4, 5], seed=3).pixels)
    assert torch.equal(loaded([4, 5], seed=3, mode="baseline").pixels, pipe([4, 5], seed=3, mode="baseline").pixels)


def test_parts_that_disagree_are_refused():
    parts = make_parts()
    other = make_parts(seed=1)
    with pytest.raises(CtfgenError, match="another codebook"):
        CTFPipeline(**(parts | {"coarse_map": other["coarse_map"]}))
    with pytest.raises(CtfgenError, match="stage 1 predicts"):
        CTFPipeline(**(parts | {"stage1": parts["baseline"]}))
    with pytest.raises(CtfgenError, match="baseline predicts"):
        CTFPipeline(**(parts | {"baseline": parts["stage1"]}))


@pytest.mark.parametrize("labels,kwargs,message", [
    ([10], {}, "out of range"), ([-1], {}, "out of range"), ([], {}, "no class labels"),
    ([1], {"cfg_scale": 0.5}, "cfg_scale"), ([1], {"top_k": 9}, "top_k"),
    ([1], {"mode": "baseline", "preview": True}, "preview"),
])
def test_bad_requests_are_refused(pipe, labels, kwargs, message):
    with pytest.raises(CtfgenError, match=message):
        pipe(labels, **kwargs)


def test_not_a_pipeline_directory(tmp_path):
    with pytest.raises(CtfgenError, match="not a ctfgen pipeline"):
        CTFPipeline.from_pretrained(tmp_path)


def test_sample_and_bench_commands(pipe, tmp_path, capsys):
    import json

    import numpy as np

    from ctfgen import cli

    pipe.save_pretrained(tmp_path / "pipe", dtype=None)
    assert cli.main(["sample", "--pipeline", str(tmp_path / "pipe"), "--per-class", "2", "--batch", "8",
                     "--npz", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "grid.png"),
                     "--preview-grid", str(tmp_path / "preview.png")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (20, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / "grid.png").is_file()
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "preview.png") as pairs:
        assert pairs.height == grid.height and pairs.width > 1.9 * grid.width  # (preview | final) pairs
    capsys.readouterr()
    for bad in (["--per-class", "0"], ["--classes", "0,12"], ["--classes", "1", "--cfg-scale", "0.5"],
                ["--classes", "1", "--top-k", "100"]):
        assert cli.main(["sample", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "bad"), *bad]) == 2
        assert capsys.readouterr().err.startswith("ctfgen: error:")
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    assert cli.main(["sample", "--pipeline", str(tmp_path), "--classes", "1"]) == 2
    assert cli.main(["bench", "--pipeline", str(tmp_path / "pipe"), "--batch", "4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ctf"]["images_per_s"] > 0 and result["baseline"]["images_per_s"] > 0
    assert 0 < result["ctf"]["decode_step_fraction_of_peak"] < 1.5


def test_assemble_and_demo_commands(tmp_path, capsys):
    from PIL import Image

    from ctfgen import cli

    parts = make_parts()
    paths = {"tokenizer": tmp_path / "tok", "map": tmp_path / "map.safetensors"}
    parts["tokenizer"].save_pretrained(paths["tokenizer"])
    parts["coarse_map"].save(paths["map"])
    for name in ("stage1", "stage2", "baseline"):
        paths[name] = tmp_path / name
        parts[name].save_pretrained(paths[name])
    args = ["assemble", "--out", str(tmp_path / "pipe"), "--tokenizer", str(paths["tokenizer"]), "--dtype", "fp32",
            "--class-names", "fmnist"]
    ctf = ["--map", str(paths["map"]), "--stage1", str(paths["stage1"]), "--stage2", str(paths["stage2"])]
    assert cli.main([*args, *ctf, "--baseline", str(paths["baseline"])]) == 0
    loaded = CTFPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.class_names[0] == "T-shirt/top" and len(loaded.class_names) == 10
    assert torch.equal(loaded([2, 9], seed=4).pixels, CTFPipeline(**parts)([2, 9], seed=4).pixels)

    assert cli.main(["demo", "--pipeline", str(tmp_path / "pipe"), "--per-class", "2", "--out",
                     str(tmp_path / "demo.png")]) == 0
    assert "demo.png" in capsys.readouterr().out
    with Image.open(tmp_path / "demo.png") as image:
        assert image.height >= 10 * 32 and image.width > 2 * 32  # a row per class, names on the left

    # Half a CTF pipeline, or parts that disagree, write nothing.
    assert cli.main([*args[:2], str(tmp_path / "bad"), *args[3:], "--stage1", str(paths["stage1"])]) == 2
    assert cli.main([*args[:2], str(tmp_path / "bad"), *args[3:], "--baseline", str(paths["stage1"])]) == 2
    assert not (tmp_path / "bad").exists()
    assert "ctfgen: error:" in capsys.readouterr().err


def test_index_naming_a_missing_part_is_refused(pipe, tmp_path):
    import shutil

    pipe.save_pretrained(tmp_path / "pipe", dtype=None)
    shutil.rmtree(tmp_path / "pipe" / "stage2")
    with pytest.raises(CtfgenError, match="names stage2"):
        CTFPipeline.from_pretrained(tmp_path / "pipe")
