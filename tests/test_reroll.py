"""Re-rolling the details of an image: reading it, its coarse labels kept, and `ctfgen reroll`."""

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen import cli
from ctfgen.errors import CtfgenError
from ctfgen.sampling.reroll import coarse_of_images, read_image
from test_pipeline import pipe, pipe_dir  # noqa: F401, F811 (the tiny pipeline's fixtures)


def test_read_image_takes_the_tokenizers_size_or_fmnist_padded(tmp_path):
    grey = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(grey, mode="L").save(tmp_path / "fmnist.png")
    padded = read_image(tmp_path / "fmnist.png", 32)
    assert padded.shape == (3, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(padded[:, 2:30, 2:30], torch.from_numpy(grey).expand(3, -1, -1))
    assert padded[:, :2].eq(0).all() and padded[:, :, 30:].eq(0).all()  # black, as the training images
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert torch.equal(read_image(tmp_path / "rgb.png", 32), torch.from_numpy(rgb).permute(2, 0, 1))
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    with pytest.raises(CtfgenError, match="big.png is 64x64; .* takes 32x32 or 28x28 images"):
        read_image(tmp_path / "big.png", 32)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(CtfgenError, match="notes.png is not an image"):
        read_image(tmp_path / "notes.png", 32)
    with pytest.raises(CtfgenError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png", 32)
    with pytest.raises(CtfgenError, match="is a folder"):
        read_image(tmp_path, 32)


def test_cli_reroll_keeps_the_coarse_labels(pipe, pipe_dir, tmp_path):  # noqa: F811
    images = pipe([7, 8], seed=0, output_type="np").images
    paths = [tmp_path / f"{name}.png" for name in ("sneaker", "bag")]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    npz, grid = tmp_path / "variations.npz", tmp_path / "grid.png"
    assert cli.main(["reroll", *map(str, paths), "--class", "Sneaker,Bag", "--n", "3", "--seed", "2",
                     "--pipeline", str(pipe_dir), "--npz", str(npz), "--grid", str(grid)]) == 0
    coarse = coarse_of_images(pipe, torch.from_numpy(images).permute(0, 3, 1, 2))
    with np.load(npz) as out:
        assert out["labels"].tolist() == [7, 7, 7, 8, 8, 8] and out["arr_0"].shape == (6, 32, 32, 3)
        kept = pipe.coarse_map.coarse_of_fine[torch.from_numpy(out["tokens"])]
        assert torch.equal(kept, coarse.repeat_interleave(3, 0))
        assert torch.equal(torch.from_numpy(out["coarse"]), kept)
        assert not np.array_equal(out["tokens"][0], out["tokens"][1])  # new details
    assert Image.open(grid).size == (2 + 5 * 34, 2 + 2 * 34)  # a row per image: it, its coarse labels, 3 variations


def test_cli_reroll_refuses_mismatched_classes(pipe_dir, tmp_path, capsys):  # noqa: F811
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    args = ["reroll", str(tmp_path / "a.png"), "--pipeline", str(pipe_dir)]
    assert cli.main(args + ["--class", "1,2"]) == 2
    assert "2 classes for 1 images" in capsys.readouterr().err
    assert cli.main(args + ["--class", "Sneakers"]) == 2
    assert "neither a class id" in capsys.readouterr().err
