"""User mistakes reach the CLI as one `ctfgen: error:` line and exit status 2, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ctfgen.cli import main
from ctfgen.tokenizer.model import VQ_PRESETS, VQModel


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    VQModel(VQ_PRESETS["VQ-tiny"]).save_pretrained(directory)
    assert (directory / "config.json").is_file()
    return directory


@pytest.fixture
def bad_folder(tmp_path):
    """Two classes of two good 16x16 PNGs each, plus one undecodable bad.jpg in class b."""
    root = tmp_path / "images"
    for c, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30))):
        (root / c).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (20, 16), colour).save(root / c / f"good{k}.png")
    bad = root / "b" / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg" * 8)
    return root, bad, 4


def shown_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows: a progress bar that tqdm (leave=False) drew and then
    erased with carriage returns on the same line does not count, only what follows its last '\r'."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, repr(captured.err)  # a single newline-terminated line
    lines = shown_lines(captured.err)
    assert len(lines) == 1, repr(captured.err)
    assert lines[0].startswith("ctfgen: error:")
    assert "Traceback" not in captured.err
    return lines[0]


def eval_args(tokenizer, *extra):
    return ["tokenizer", "eval", "--tokenizer", str(tokenizer), "--device", "cpu", *extra]


def test_eval_missing_data_dir(tiny_tokenizer, tmp_path, capsys):
    missing = tmp_path / "no-fmnist-here"
    assert main(eval_args(tiny_tokenizer, "--data-dir", str(missing))) == 2
    line = error_line(capsys)
    assert str(missing) in line
    assert "apt-get install" in line


def test_eval_missing_data_dir_subprocess(tiny_tokenizer, tmp_path):
    missing = tmp_path / "absent"
    env = {k: v for k, v in os.environ.items() if k != "CTFGEN_DATA"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ctfgen.cli", *eval_args(tiny_tokenizer, "--data-dir", str(missing))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()  # text mode: a '\r' would show up here as a line break too
    assert len(lines) == 1 and proc.stderr.endswith("\n"), repr(proc.stderr)
    assert lines[0].startswith("ctfgen: error:")
    assert str(missing) in lines[0]


def test_eval_tokenizer_without_config(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "empty-tokenizer"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "model.safetensors").write_bytes(b"")
    args = eval_args(not_a_checkpoint, "--data-dir", str(tmp_path / "unused"))
    assert main(args) == 2
    line = error_line(capsys)
    assert str(not_a_checkpoint) in line
    assert "config.json" in line


def test_eval_tokenizer_dir_missing(tmp_path, capsys):
    assert main(eval_args(tmp_path / "nope", "--data-dir", str(tmp_path / "unused"))) == 2
    assert str(tmp_path / "nope") in error_line(capsys)


def test_eval_corrupt_image(tiny_tokenizer, bad_folder, capsys):
    root, bad, _ = bad_folder
    assert main(eval_args(tiny_tokenizer, "--data", str(root), "--image-size", "16")) == 2
    line = error_line(capsys)
    assert str(bad) in line
    assert "--skip-bad-images" in line


def test_eval_skip_bad_images_json(tiny_tokenizer, bad_folder, capsys):
    root, _, n_good = bad_folder
    args = eval_args(tiny_tokenizer, "--data", str(root), "--image-size", "16", "--skip-bad-images", "--json",
                     "--batch-size", "2")
    with pytest.warns(UserWarning, match="bad.jpg"):
        assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_skipped"] == 1
    assert result["n_images"] == n_good
    assert result["codebook_size"] == VQ_PRESETS["VQ-tiny"].codebook_size
    assert 0 < result["codes_used"] <= result["codebook_size"]
    assert result["psnr"] > 0


def test_eval_all_images_bad_with_skip(tiny_tokenizer, tmp_path, capsys):
    root = tmp_path / "allbad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"junk" * 10)
    args = eval_args(tiny_tokenizer, "--data", str(root), "--image-size", "16", "--skip-bad-images")
    with pytest.warns(UserWarning):
        assert main(args) == 2
    error_line(capsys)


def test_train_unknown_preset(fake_fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["tokenizer", "train", "--out", str(out), "--model", "VQ-nonexistent", "--data-dir", str(fake_fmnist),
            "--device", "cpu", "--steps", "1", "--no-progress"]
    assert main(args) == 2
    line = error_line(capsys)
    assert "VQ-nonexistent" in line
    assert "VQ-tiny" in line  # the valid presets are listed
    assert not (out / "checkpoint").exists()
