import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen import cli
from ctfgen.bench import benchmark
from ctfgen.clustering import cluster_codebook
from ctfgen.data.datasets import FMNIST_CLASSES, to_uint8
from ctfgen.errors import CtfgenError
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner, refiner_config
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import SamplingParams
from ctfgen.tokenizer.model import VQ_PRESETS, VQConfig, VQModel

SHIPPED_CLASSIFIER = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist" / "classifier"
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
    return CTFPipeline(**make_parts(), class_names=list(FMNIST_CLASSES))


@pytest.fixture(scope="module")
def pipe_dir(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("pipe") / "pipe", dtype=None)


def test_images_seeds_and_preview(pipe):
    out = pipe([0, 3, 7], seed=1, preview=True)
    assert len(out.images) == 3 and out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    assert len(out.previews) == 3 and out.labels == [0, 3, 7]
    assert out.tokens.shape == out.coarse.shape == (3, 8, 8)
    again = pipe([0, 3, 7], seed=1, output_type="pt")
    assert torch.equal(again.images, torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in out.images]))
    assert not torch.equal(again.images, pipe([0, 3, 7], seed=2, output_type="pt").images)
    baseline = pipe([1, 2], mode="baseline", seed=0, output_type="pt")
    assert baseline.images.shape == (2, 3, 32, 32) and baseline.coarse is None


def test_preview_decodes_each_labels_normalised_mean_codeword(pipe):
    """A stage-1 preview is the decoder's picture of, at each position, the mean of its cluster's codewords (the
    tokenizer's codes, L2-normalised), normalised again as a code is: computed here in numpy, cluster by cluster."""
    assert pipe.tokenizer.config.codebook_l2_norm
    codewords = pipe.tokenizer.codebook_weights.double().numpy()
    codewords /= np.linalg.norm(codewords, axis=1, keepdims=True)
    cluster_of = pipe.coarse_map.coarse_of_fine.numpy()
    means = np.stack([codewords[cluster_of == c].mean(0) for c in range(pipe.coarse_map.k)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    out = pipe([0, 3, 7], seed=1, preview=True, output_type="pt")
    latents = means[out.coarse.numpy()].transpose(0, 3, 1, 2)  # [B, D, h, w]
    np.testing.assert_allclose(pipe.cluster_mean_latents(out.coarse).numpy(), latents, rtol=0, atol=1e-6)
    with torch.no_grad():
        decoded = to_uint8(pipe.tokenizer.decode_latents(torch.from_numpy(latents).float()))
        assert (out.previews.int() - decoded.int()).abs().max() <= 1  # float32 latents: a rounding may flip
        assert (out.images.int() - decoded.int()).abs().max() > 10  # the previews are not the final images
        # Exactly, with a float64 decoder: no float32 rounding to flip a pixel.
        exact = CTFPipeline(copy.deepcopy(pipe.tokenizer).double(), pipe.coarse_map, pipe.stage1, pipe.stage2)
        expected = to_uint8(exact.tokenizer.decode_latents(torch.from_numpy(latents)))
    assert torch.equal(exact.decode_preview(out.coarse), expected)


def test_output_types(pipe):
    pt = pipe([1, 2], seed=0, output_type="pt", preview=True)
    assert pt.images.dtype == torch.uint8 and pt.images.shape == (2, 3, 32, 32)
    assert torch.equal(pt.labels, torch.tensor([1, 2]))
    np_out = pipe([1, 2], seed=0, output_type="np", preview=True)
    assert np_out.images.dtype == np.uint8 and np_out.images.shape == (2, 32, 32, 3)
    assert np.array_equal(np_out.images, pt.images.permute(0, 2, 3, 1).numpy())
    assert np_out.labels.dtype == np.int64 and np_out.labels.tolist() == [1, 2]
    assert np.array_equal(np_out.previews, pt.previews.permute(0, 2, 3, 1).numpy())


def test_classes_by_id_or_name_and_counts(pipe):
    out = pipe(["Sneaker", 2, 3.0, "4", np.int64(5), torch.tensor(6)], per_class=2, seed=0, output_type="pt")
    assert out.labels.tolist() == [7, 7, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert pipe("Bag", seed=0).labels == [8] and pipe(9, seed=0).labels == [9]
    by_name = pipe(["T-shirt/top", "Ankle boot"], seed=3, output_type="pt")
    assert torch.equal(by_name.images, pipe([0, 9], seed=3, output_type="pt").images)


def test_batch_size_does_not_change_the_images_for_a_seed(pipe):
    """Each image draws from its own generator: batch 1 and batch 7 give the same tokens, up to float rounding
    across batch shapes that may flip a near-tie in float32, and exactly in float64."""
    classes = list(range(10)) + [3, 3, 8, 8]

    def tokens(p, batch_size):
        out = p(classes, seed=11, batch_size=batch_size, output_type="pt")
        return torch.cat([out.coarse.flatten(1), out.tokens.flatten(1)], 1)

    one, seven = tokens(pipe, 1), tokens(pipe, 7)
    assert (one == seven).float().mean() >= 0.99
    exact = pipe.copy(torch.float64)
    assert torch.equal(tokens(exact, 1), tokens(exact, 7))
    # the rest of the request does not matter either: image 3 of the request is image 3 whatever follows it
    head = pipe(classes[:4], seed=11, batch_size=7, output_type="pt")
    assert (head.tokens.flatten(1) == seven[:4, 64:]).float().mean() >= 0.99


@pytest.mark.parametrize("classes,kwargs,message", [
    ([10], {}, "out of range"), ([-1], {}, "out of range"), ([], {}, "no classes given"),
    (["Sneakers"], {}, "neither a class id .* nor a class name"), ([2.5], {}, "neither a class id"),
    ([float("nan")], {}, "neither a class id"), ([True], {}, "neither a class id"),
    ([1], {"per_class": 0}, "per_class must be at least 1"), ([1], {"batch_size": 0}, "batch_size"),
    ([1], {"output_type": "jpg"}, "output_type"), ([1], {"mode": "fast"}, "unknown mode"),
    ([1], {"sampling": {"temperature": 1.0}}, "sampling must be a SamplingParams"),
    ([1], {"sampling": SamplingParams(top_k=9)}, "top_k must be between 0 .* 8"),
    ([1], {"stage2_sampling": SamplingParams(top_k=65)}, "stage 2: top_k"),
    ([1], {"stage2_sampling": SamplingParams(cfg_interval=3)}, "cfg_interval is for stage 1"),
    ([1], {"mode": "baseline", "preview": True}, "preview"), ([1], {"callback_steps": 0}, "callback_steps"),
    ([1], {"callback": 3}, "callback must be callable"), ([1], {"seed": -1}, "seed"), ([1], {"seed": 0.5}, "seed"),
    ([1, 2], {"seed": [(0, 0)]}, "one \\(seed, index\\) pair per image"), ([1], {"seed": [5]}, "pair"),
    ([1], {"seed": [(0, -1)]}, "image index must be between 0 and 4294967295"),
    ([1], {"seed": 2**32}, "seed must be between 0 and 4294967295"), ([1], {"seed": [(2**70, 0)]}, "seed must be"),
])
def test_bad_requests_are_refused(pipe, classes, kwargs, message):
    with pytest.raises(CtfgenError, match=message):
        pipe(classes, **kwargs)


def test_per_image_seeds_merge_requests(pipe):
    """One call over the images of several requests, each image with its request's (seed, index) pair, gives
    every request its own images: in float64 exactly, in float32 up to a near-tie flipped by the batch shape."""
    def merged_and_alone(p):
        alone = [p([0, 3], seed=4, output_type="pt"), p([7], seed=9, output_type="pt")]
        merged = p([0, 3, 7], seed=[(4, 0), (4, 1), (9, 0)], output_type="pt")
        grids = [torch.cat([out.coarse.flatten(1), out.tokens.flatten(1)], 1) for out in (merged, *alone)]
        return grids[0], torch.cat(grids[1:])

    merged, alone = merged_and_alone(pipe)
    assert (merged == alone).float().mean() >= 0.99
    assert torch.equal(*merged_and_alone(pipe.copy(torch.float64)))


def test_encode_gives_the_tokens_of_images(pipe):
    images = pipe([1, 2], seed=0, output_type="pt").images
    tokens = pipe.encode(images)
    assert tokens.shape == (2, 8, 8) and torch.equal(tokens, pipe.tokenizer.encode(images.float() / 127.5 - 1))
    with pytest.raises(CtfgenError, match="uint8 \\[B, 3, 32, 32\\]"):
        pipe.encode(images[:, :, :28, :28])


def test_a_refused_request_leaves_the_generator_alone(pipe):
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(CtfgenError):
        pipe([1, 99], seed=generator)
    first = pipe([1], seed=generator, output_type="pt")
    assert torch.equal(first.images, pipe([1], seed=torch.Generator().manual_seed(0), output_type="pt").images)
    assert not torch.equal(first.images, pipe([1], seed=generator, output_type="pt").images)


def test_callback_streams_the_coarse_tokens_of_each_batch(pipe):
    calls = []
    out = pipe([0, 1, 2], seed=0, batch_size=2, output_type="pt", callback_steps=16,
               callback=lambda first, step, tokens: calls.append((first, step, tokens.clone())))
    assert [(first, step, tuple(tokens.shape)) for first, step, tokens in calls] == \
        [(0, s, (2, s)) for s in (16, 32, 48, 64)] + [(2, s, (1, s)) for s in (16, 32, 48, 64)]
    assert torch.equal(torch.cat([calls[3][2], calls[7][2]]), out.coarse.flatten(1))


def test_variations_keep_the_coarse_grids(pipe):
    out = pipe([0, 3], seed=1, output_type="pt")
    varied = pipe.variations(out.coarse, out.labels, n=3, seed=5, output_type="pt")
    assert varied.labels.tolist() == [0, 0, 0, 3, 3, 3] and varied.images.shape == (6, 3, 32, 32)
    assert torch.equal(pipe.coarse_map.coarse_of_fine[varied.tokens], out.coarse.repeat_interleave(3, 0))
    assert torch.equal(varied.coarse, out.coarse.repeat_interleave(3, 0))
    assert not torch.equal(varied.tokens[0], varied.tokens[1])  # the details do change
    # With n = 1 and the request's seed, image j re-draws image j's stage-2 numbers: the same images.
    assert torch.equal(pipe.variations(out.coarse, out.labels, seed=1, output_type="pt").tokens, out.tokens)
    with pytest.raises(CtfgenError, match="shape"):
        pipe.variations(out.coarse.flatten(1), out.labels)
    with pytest.raises(CtfgenError, match="labels 0..7"):
        pipe.variations(out.coarse + 8, out.labels)
    with pytest.raises(CtfgenError, match="one class per grid"):
        pipe.variations(out.coarse, [0])


def test_sampling_leaves_the_models_as_they_were():
    """Class dropout is off while sampling, whatever mode the caller left the models in; the mode is kept."""
    parts = make_parts()
    pipe = CTFPipeline(**parts)
    reference = pipe([1, 2, 3], seed=0, output_type="pt").images
    parts["stage1"].train()
    parts["stage2"].train()
    assert torch.equal(pipe([1, 2, 3], seed=0, output_type="pt").images, reference)
    assert parts["stage1"].training and parts["stage2"].training and not parts["baseline"].training


def test_bench_times_a_copy_and_leaves_the_models_alone(pipe):
    caches = [layer.attention.kv_cache for layer in pipe.stage1.layers]  # set up by earlier requests, if any
    result = benchmark(pipe, batch=4, repeats=1, precision="bf16")
    assert result["precision"] == "bf16" and result["ctf"]["images_per_s"] > 0
    assert result["baseline"]["images_per_s"] > 0
    # A fraction of the peak is FLOPs per second over the peak of the step's dtype, measured in the same run (no
    # ceiling asserted: where bf16 is emulated, a step's fp32 parts outrun the bf16 matmul peak).
    peak = result["bf16_matmul_peak_flops"]
    for key in ("ctf", "baseline"):
        fraction = result[key]["decode_step_fraction_of_peak"]
        assert fraction > 0 and fraction == pytest.approx(result[key]["decode_step_flops"] / peak)
    for model in (pipe.stage1, pipe.stage2, pipe.baseline):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not pipe.decoding_compiled
    assert all(layer.attention.kv_cache is cache for layer, cache in zip(pipe.stage1.layers, caches))


def test_save_and_load_roundtrip(pipe, pipe_dir):
    loaded = CTFPipeline.from_pretrained(pipe_dir)
    for mode in ("ctf", "baseline"):
        assert torch.equal(loaded([4, 5], seed=3, mode=mode, output_type="pt").images,
                           pipe([4, 5], seed=3, mode=mode, output_type="pt").images)


def test_parts_that_disagree_are_refused():
    parts = make_parts()
    other = make_parts(seed=1)
    with pytest.raises(CtfgenError, match="another codebook"):
        CTFPipeline(**(parts | {"coarse_map": other["coarse_map"]}))
    with pytest.raises(CtfgenError, match="stage 1 predicts"):
        CTFPipeline(**(parts | {"stage1": parts["baseline"]}))
    with pytest.raises(CtfgenError, match="baseline predicts"):
        CTFPipeline(**(parts | {"baseline": parts["stage1"]}))


def test_not_a_pipeline_directory(tmp_path):
    with pytest.raises(CtfgenError, match="not a ctfgen pipeline"):
        CTFPipeline.from_pretrained(tmp_path)


def grid_images(path, n_rows: int, n_cols: int, size: int = 32, pad: int = 2) -> np.ndarray:
    """The images of a grid PNG (make_grid, optionally with row labels on the left): [rows * cols, H, W, 3]."""
    with Image.open(path) as grid:
        array = np.asarray(grid.convert("RGB"))
    left = array.shape[1] - (n_cols * (size + pad) + pad)  # the width of the row labels, if any
    return np.stack([array[pad + r * (size + pad):pad + r * (size + pad) + size,
                           left + pad + c * (size + pad):left + pad + c * (size + pad) + size]
                     for r in range(n_rows) for c in range(n_cols)])


def test_demo_and_sample_draw_the_same_images_for_a_seed(pipe_dir, tmp_path):
    assert cli.main(["demo", "--pipeline", str(pipe_dir), "--per-class", "2", "--seed", "4",
                     "--out", str(tmp_path / "demo.png")]) == 0
    assert cli.main(["sample", "--pipeline", str(pipe_dir), "--per-class", "2", "--seed", "4",
                     "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        samples = f["arr_0"]
    assert np.array_equal(grid_images(tmp_path / "demo.png", 10, 2), samples)


def test_sample_command_outputs(pipe, pipe_dir, tmp_path):
    assert cli.main(["sample", "--pipeline", str(pipe_dir), "--per-class", "2", "--batch", "8",
                     "--npz", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "grid.png"),
                     "--preview-grid", str(tmp_path / "preview.png"), "--stage2-temperature", "0.5"]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (20, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [c for c in range(10) for _ in range(2)]
        assert f["class_names"].tolist() == pipe.class_names  # for `ctfgen eval` to match them to its classifier's
        assert np.array_equal(grid_images(tmp_path / "grid.png", 10, 2), f["arr_0"])
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "preview.png") as pairs:
        assert pairs.height == grid.height and pairs.width > 1.9 * grid.width  # (preview | final) pairs
    assert cli.main(["sample", "--pipeline", str(pipe_dir), "--classes", "Sneaker,3", "--out",
                     str(tmp_path / "pngs")]) == 0
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000000_class7.png", "000001_class3.png"]
    assert cli.main(["sample", "--pipeline", str(pipe_dir), "--classes", "Sneaker,3", "--per-class", "2", "--npz",
                     str(tmp_path / "two_each.npz"), "--grid", str(tmp_path / "two_each.png")]) == 0
    with np.load(tmp_path / "two_each.npz") as f:
        assert f["labels"].tolist() == [7, 7, 3, 3]
        assert np.array_equal(grid_images(tmp_path / "two_each.png", 2, 2), f["arr_0"])  # a row per class


@pytest.mark.parametrize("bad,message", [
    (["--per-class", "0"], "per_class must be at least 1"), (["--classes", "0,12"], "class id 12 is out of range"),
    (["--classes", "Sneakers"], "nor a class name"), (["--classes", "1", "--cfg-scale", "0.5"], "cfg_scale"),
    (["--classes", "1", "--top-k", "100"], "top_k"), (["--classes", "1", "--temperature", "nan"], "temperature"),
    (["--classes", "1", "--stage2-top-p", "0"], "stage-2 settings .*top_p"),
    (["--classes", "1", "--batch", "0"], "batch_size"), ([], "say what to sample"),
])
def test_sample_command_refuses_bad_requests_before_writing(pipe_dir, tmp_path, capsys, bad, message):
    assert cli.main(["sample", "--pipeline", str(pipe_dir), "--out", str(tmp_path / "bad"), "--npz",
                     str(tmp_path / "bad.npz"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctfgen: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.npz").exists()


def test_sample_command_refuses_a_directory_that_is_no_pipeline(tmp_path):
    assert cli.main(["sample", "--pipeline", str(tmp_path), "--classes", "1"]) == 2


def test_bench_command(pipe_dir, capsys):
    assert cli.main(["bench", "--pipeline", str(pipe_dir), "--batch", "4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ctf"]["images_per_s"] > 0 and result["baseline"]["images_per_s"] > 0
    assert 0 < result["ctf"]["decode_step_fraction_of_peak"] < 1.5


@pytest.fixture(scope="module")
def part_dirs(tmp_path_factory):
    """The parts of make_parts() saved one by one, as `ctfgen assemble` takes them."""
    root = tmp_path_factory.mktemp("parts")
    parts = make_parts()
    paths = {"tokenizer": root / "tok", "map": root / "map.safetensors"}
    parts["tokenizer"].save_pretrained(paths["tokenizer"])
    parts["coarse_map"].save(paths["map"])
    for name in ("stage1", "stage2", "baseline"):
        paths[name] = root / name
        parts[name].save_pretrained(paths[name])
    return paths


def assemble_args(out, part_dirs, **parts) -> list[str]:
    """`ctfgen assemble` of the saved tokenizer and the parts named by flag (stage1="stage1", ...)."""
    flags = [arg for flag, name in parts.items() for arg in (f"--{flag}", str(part_dirs[name]))]
    return ["assemble", "--out", str(out), "--tokenizer", str(part_dirs["tokenizer"]), "--dtype", "fp32",
            "--class-names", "fmnist", *flags]


def test_assemble_command_makes_the_pipeline_of_its_parts(part_dirs, tmp_path):
    parts = {name: name for name in ("map", "stage1", "stage2", "baseline")}
    assert cli.main(assemble_args(tmp_path / "pipe", part_dirs, **parts)) == 0
    loaded = CTFPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.class_names[0] == "T-shirt/top" and len(loaded.class_names) == 10
    assert torch.equal(loaded([2, 9], seed=4, output_type="pt").images,
                       CTFPipeline(**make_parts())([2, 9], seed=4, output_type="pt").images)


@pytest.mark.parametrize("parts", [{"stage1": "stage1"}, {"baseline": "stage1"}],
                         ids=["half-a-ctf-pipeline", "stage1-as-baseline"])
def test_assemble_command_refuses_parts_that_make_no_pipeline(part_dirs, tmp_path, capsys, parts):
    assert cli.main(assemble_args(tmp_path / "bad", part_dirs, **parts)) == 2
    assert not (tmp_path / "bad").exists()
    assert "ctfgen: error:" in capsys.readouterr().err


def test_demo_command_draws_a_labelled_row_per_class(pipe_dir, tmp_path, capsys):
    assert cli.main(["demo", "--pipeline", str(pipe_dir), "--per-class", "2", "--out",
                     str(tmp_path / "demo.png")]) == 0
    assert "demo.png" in capsys.readouterr().out
    with Image.open(tmp_path / "demo.png") as image:
        assert image.height >= 10 * 32 and image.width > 2 * 32  # a row per class, names on the left


def test_index_naming_a_missing_part_is_refused(pipe, tmp_path):
    import shutil

    pipe.save_pretrained(tmp_path / "pipe", dtype=None)
    shutil.rmtree(tmp_path / "pipe" / "stage2")
    with pytest.raises(CtfgenError, match="names stage2"):
        CTFPipeline.from_pretrained(tmp_path / "pipe")


def test_index_naming_a_part_outside_the_folder_is_refused(pipe, tmp_path):
    import json

    pipe.save_pretrained(tmp_path / "elsewhere", dtype=None)  # a real part, but not inside the pipeline
    pipe.save_pretrained(tmp_path / "pipe", dtype=None)
    index_path = tmp_path / "pipe" / "pipeline.json"
    index = json.loads(index_path.read_text())
    index["parts"]["stage2"] = "../elsewhere/stage2"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CtfgenError, match="outside the pipeline's folder"):
        CTFPipeline.from_pretrained(tmp_path / "pipe")


def test_evaluation_scores_the_images_that_sample_draws(pipe, pipe_dir, tmp_path, monkeypatch):
    from ctfgen.evaluation import evaluate_pipeline, load_feature_network

    monkeypatch.setenv("CTFGEN_CACHE", str(tmp_path / "cache"))
    assert cli.main(["sample", "--pipeline", str(pipe_dir), "--per-class", "3", "--batch", "5", "--seed", "2",
                     "--npz", str(tmp_path / "s.npz")]) == 0
    network = load_feature_network("fmnist", classifier=SHIPPED_CLASSIFIER)
    result = evaluate_pipeline(pipe, network, 3, ref=str(tmp_path / "s.npz"), batch_size=5, seed=2)
    assert result["n_samples"] == result["n_ref"] == 30
    assert result["precision"] == result["recall"] == 1.0 and abs(result["fid"]) < 1e-3  # the very same images
