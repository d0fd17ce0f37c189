"""`ctfgen fit` end to end on a small colour folder of its own (classes of shapes, mixed sizes and modes, one corrupt
file), with the tiny preset: the run, sampling its pipeline, a rerun that redoes nothing, a changed option, the
refusals, and (slow) SIGKILLs during training followed by a rerun that gives the uninterrupted run's weights."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import send_signal_at_step
from ctfgen import cli
from ctfgen.checkpoint import load_weights
from ctfgen.data.datasets import crop_original
from ctfgen.errors import CtfgenError
from ctfgen.files import held_alone
from ctfgen.fit.data import scan_folder, write_layout
from ctfgen.fit.presets import resolve
from ctfgen.fit.report import STILL_FALLING, last_quarter_drop

SHAPES = {"circle": (230, 60, 40), "square": (40, 200, 80), "triangle": (60, 90, 240)}
SIZES = [(20, 24), (40, 32), (64, 64), (33, 47)]
MODES = ["RGB", "RGBA", "P", "L", "I;16", "JPEG"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def shape_image(kind: str, size: tuple, rng) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 60, 3)))
    m = min(w, h)
    cx, cy, r = w / 2 + int(rng.integers(-m // 8, m // 8 + 1)), h / 2, m * rng.uniform(0.25, 0.4)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=SHAPES[kind])
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=SHAPES[kind])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=SHAPES[kind])
    return image


def make_shapes(root: Path, per_class: int = 12) -> Path:
    """root/<shape>/<i>.png|jpg in every mode of MODES (RGBA, palette, grey, 16-bit grey, JPEG) and four sizes, and
    one corrupt PNG."""
    rng = np.random.default_rng(0)
    for c, kind in enumerate(SHAPES):
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            image, mode = shape_image(kind, SIZES[i % len(SIZES)], rng), MODES[(i + c) % len(MODES)]
            if mode == "JPEG":
                image.save(root / kind / f"{i}.jpg", quality=90)
            elif mode == "I;16":
                Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257).save(root / kind / f"{i}.png")
            elif mode == "P":
                image.convert("P", palette=Image.ADAPTIVE, colors=16).save(root / kind / f"{i}.png")
            else:
                image.convert(mode).save(root / kind / f"{i}.png")
    (root / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return root


def run_fit(*args) -> tuple[int, str, str]:
    """`ctfgen fit ...` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["fit", "--preset", "tiny", "--no-progress", *map(str, args)])
    return status, out.getvalue(), err.getvalue()


def step_lines(stdout: str, word: str) -> list[str]:
    """The names of the steps whose line holds `word` ("skipped", "done in", "redone", "resuming")."""
    return [line.split("] ")[1].split(":")[0] for line in stdout.splitlines() if "] " in line and word in line]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, shapes):
    out = tmp_path_factory.mktemp("fit") / "run"
    tic = time.perf_counter()
    status, stdout, stderr = run_fit("--data", shapes, "--out", out)
    assert status == 0, stderr
    return out, stdout, time.perf_counter() - tic


STEPS = ["data", "tokenizer", "map", "codes", "stage1", "stage2", "baseline", "pipeline", "report"]


def test_fit_tiny_end_to_end_then_sample(fitted, shapes, tmp_path):
    out, stdout, seconds = fitted
    assert step_lines(stdout, "done in") == STEPS
    assert f"skipping unreadable image {shapes / 'square' / 'broken.png'}" in stdout
    assert "1 unreadable image(s) skipped" in stdout
    record = json.loads((out / "fit.json").read_text())
    assert record["command"].startswith("ctfgen fit --preset tiny") and record["preset"] == "tiny"
    assert [name for name, step in record["steps"].items() if step["state"] == "done"] == STEPS
    assert record["config"]["k"] == 8 and record["config"]["codebook_size"] == 64
    # 12 images per class, one corrupt square: 11 usable; 25% of each class held out (3, 3, 3).
    assert (record["data"]["n_train"], record["data"]["n_val"]) == (27, 9)
    links = sorted((out / "data" / "train").rglob("*.*")) + sorted((out / "data" / "val").rglob("*.*"))
    assert len(links) == 36 and all(p.is_symlink() for p in links)
    assert {p.resolve() for p in links} == {p.resolve() for p in shapes.rglob("*.*") if p.name != "broken.png"}

    from ctfgen.pipeline import CTFPipeline

    pipe = CTFPipeline.from_pretrained(out / "pipeline")
    assert pipe.class_names == list(SHAPES) and pipe.baseline is not None and pipe.grid == 8
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--pipeline", str(out / "pipeline"), "--per-class", "2", "--grid", str(grid)]) == 0
    assert Image.open(grid).size[0] > 16

    report = json.loads((out / "report.json").read_text())
    assert np.isfinite(report["tokenizer"]["psnr"]) and 0 < report["tokenizer"]["codebook_usage"] <= 1
    assert report["tokenizer"]["n_images"] == 9
    assert set(report["training"]) == {"stage1", "stage2", "baseline"}
    assert all(len(curve["eval_loss"]) == 4 for curve in report["training"].values())  # every 10 of 40 steps
    for stage, curve in report["training"].items():  # a loss still falling is flagged, and only then
        falling = curve["fell_last_quarter"] > STILL_FALLING * curve["eval_loss"][-1]
        assert falling == any(note.startswith(f"{stage}'s held-out loss was still falling") for note in report["notes"])
    assert report["fid"] == {} and any("no FID" in note for note in report["notes"])
    figures = {"report/samples_ctf.png", "report/samples_baseline.png"}
    try:
        import matplotlib  # noqa: F401
        figures |= {f"report/loss_{stage}.png" for stage in ("stage1", "stage2", "baseline")}
    except ImportError:
        assert any("matplotlib is not installed" in note for note in report["notes"])
    assert set(report["figures"]) == figures and all((out / name).is_file() for name in figures)
    text = (out / "report.md").read_text()
    assert "broken.png" in text and "![report/samples_ctf.png]" in text and "fell over the last quarter" in text
    print(f"tiny preset fit: {seconds:.1f}s")


def test_last_quarter_drop_reads_from_three_quarters_of_the_steps_to_the_last():
    curve = {"steps": [100, 200, 300, 400], "eval_loss": [5.0, 4.5, 4.25, 4.0]}
    assert last_quarter_drop(curve) == pytest.approx(0.25)  # 4.25 at step 300 to 4.0 at 400, not from 4.5
    assert last_quarter_drop({"steps": [100, 350, 400], "eval_loss": [5.0, 3.9, 4.0]}) == pytest.approx(-0.1)  # rose
    assert last_quarter_drop({"steps": [100, 400], "eval_loss": [5.0, 4.0]}) is None  # one measurement in it
    assert last_quarter_drop({"steps": [], "eval_loss": []}) is None


def test_rerun_redoes_nothing(fitted, shapes):
    out, _, _ = fitted
    weights = out / "pipeline" / "stage1" / "model.safetensors"
    before = (json.loads((out / "fit.json").read_text())["steps"], weights.stat().st_mtime_ns)
    status, stdout, stderr = run_fit("--data", shapes, "--out", out)
    assert status == 0, stderr
    assert step_lines(stdout, "skipped") == STEPS and step_lines(stdout, "done in") == []
    assert "skipping unreadable image" not in stdout  # the images were decoded once, by the first run
    assert (json.loads((out / "fit.json").read_text())["steps"], weights.stat().st_mtime_ns) == before


def test_changed_option_redoes_that_step_and_the_ones_after_it(fitted, shapes, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(fitted[0], out, symlinks=True)
    stale = [out / ".pipeline.k1ll3d00", out / ".report.md.k1ll3d00", out / ".fit.json.k1ll3d00"]  # killed writes
    shutil.copytree(out / "pipeline", stale[0])
    stale[1].write_text("half a rep")
    stale[2].write_text("{")
    status, stdout, stderr = run_fit("--data", shapes, "--out", out, "--k", 4)
    assert status == 0, stderr
    assert step_lines(stdout, "skipped") == ["data", "tokenizer", "codes", "baseline"]
    assert step_lines(stdout, "done in") == ["map", "stage1", "stage2", "pipeline", "report"]
    assert "map: k-means of the 64 codewords into K = 4 clusters (redone: k 8 -> 4)" in stdout
    assert "stage1: training GPT-tiny for 40 steps of 8 grids (redone: the map step changed)" in stdout
    from ctfgen.pipeline import CTFPipeline

    assert CTFPipeline.from_pretrained(out / "pipeline").coarse_map.k == 4
    assert not any(path.exists() for path in stale)


def test_reuses_a_given_tokenizer_and_can_leave_the_baseline_out(fitted, shapes, tmp_path):
    from ctfgen.pipeline import CTFPipeline

    tokenizer = fitted[0] / "pipeline" / "tokenizer"
    status, stdout, stderr = run_fit("--data", shapes, "--out", tmp_path / "run", "--tokenizer", tokenizer,
                                     "--no-baseline")
    assert status == 0, stderr
    assert f"tokenizer: reusing {tokenizer}" in stdout and not (tmp_path / "run" / "runs" / "tokenizer").exists()
    assert step_lines(stdout, "done in") == [step for step in STEPS if step != "baseline"]
    pipe = CTFPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.baseline is None
    assert pipe.tokenizer.fingerprint == CTFPipeline.from_pretrained(tokenizer.parent).tokenizer.fingerprint


def test_refusals_leave_nothing_written(tmp_path, shapes):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    status, _, stderr = run_fit("--data", shapes, "--out", foreign)
    assert status == 2 and "is not empty and holds no ctfgen fit" in stderr and len(stderr.splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    few = tmp_path / "few"
    shutil.copytree(shapes, few)
    for path in sorted((few / "circle").iterdir())[1:]:
        path.unlink()
    status, _, stderr = run_fit("--data", few, "--out", tmp_path / "out")
    assert status == 2 and "class 'circle' has 1 usable image(s)" in stderr and len(stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x.png").write_bytes(b"junk")
    status, _, stderr = run_fit("--data", empty, "--out", tmp_path / "out")
    assert status == 2 and "no usable image (1 unreadable" in stderr and not (tmp_path / "out").exists()

    (tmp_path / "bare").mkdir()
    status, _, stderr = run_fit("--data", tmp_path / "bare", "--out", tmp_path / "out")
    assert status == 2 and "has no class sub-folders" in stderr and not (tmp_path / "out").exists()

    config = tmp_path / "fit.toml"
    config.write_text("stpes = 3\n")
    status, _, stderr = run_fit("--data", shapes, "--out", tmp_path / "out", "--config", config)
    assert status == 2 and "unknown key 'stpes'" in stderr and not (tmp_path / "out").exists()


def test_a_second_fit_in_the_same_folder_is_refused_while_the_first_runs(fitted, shapes):
    """Two fits of one folder at once would train the same runs over each other: while one holds the folder (its
    lock, as a running fit holds it), another is refused with one line and changes nothing."""
    out = fitted[0]
    before = (out / "fit.json").read_bytes()
    with held_alone(out, "the test"):
        status, stdout, stderr = run_fit("--data", shapes, "--out", out)
    assert status == 2
    assert stderr.strip() == (f"ctfgen: error: --out {out} is in use by another ctfgen process running now; wait for "
                              f"it to finish (or stop it) and run again")
    assert (out / "fit.json").read_bytes() == before
    status, stdout, _ = run_fit("--data", shapes, "--out", out)  # the lock went with its holder
    assert status == 0 and step_lines(stdout, "skipped") == STEPS


def test_layout_links_and_pads_without_touching_the_originals(tmp_path):
    """Links to the usable images, the held-out share drawn per class; images of Fashion-MNIST's kind (28x28 grey)
    copied padded to 32x32; the originals' permissions untouched (a chmod through a link would change them)."""
    colour = make_shapes(tmp_path / "colour", per_class=4)
    (colour / "circle" / "0.png").chmod(0o600)
    data, files = scan_folder(colour, 0.5, 0, "fp", tmp_path / "a" / "data", progress=False)
    assert [len(per_class) for per_class in files["val"]] == [2, 2, 2] == [len(p) for p in files["train"]]
    assert [entry["path"] for entry in data.skipped] == [str(colour / "square" / "broken.png")]
    write_layout(data, files)
    assert (colour / "circle" / "0.png").stat().st_mode & 0o777 == 0o600
    assert not data.fmnist_like and (tmp_path / "a" / "data" / "train" / "circle" / "000000.png").is_symlink()

    grey = tmp_path / "grey"
    for name, value in (("dark", 60), ("light", 200)):
        (grey / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), value + i, dtype=np.uint8)).save(grey / name / f"{i}.png")
    data, files = scan_folder(grey, 0.3, 0, "fp", tmp_path / "b" / "data", progress=False)
    write_layout(data, files)
    assert data.fmnist_like and (data.n_train, data.n_val) == (4, 2)
    copy = np.asarray(Image.open(next((tmp_path / "b" / "data" / "train" / "light").iterdir())))
    assert copy.shape == (32, 32) and copy[2:30, 2:30].min() >= 200 and copy[:2].max() == 0 and copy[:, 30:].max() == 0


def test_fmnist_exported_as_a_folder_reads_back_as_the_bundled_images(fake_fmnist, tmp_path):
    """scripts/export_fmnist.py (issue 22's folder-path check): train/ and val/ of 28x28 PNGs, one folder a class,
    which the fit's scan takes as Fashion-MNIST's kind with its pixels unchanged; a second export is refused."""
    script = [sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "export_fmnist.py"),
              "--data-dir", str(fake_fmnist), "--out", str(tmp_path / "png")]
    subprocess.run(script, check=True, capture_output=True)
    data, files = scan_folder(tmp_path / "png", 0.1, 0, "fp", tmp_path / "fit" / "data", progress=False)
    assert data.fmnist_like and (data.n_train, data.n_val) == (256, 64) and len(data.classes) == 10
    assert "T-shirt_top" in data.classes
    from ctfgen.data.datasets import FashionMNIST

    first = np.asarray(Image.open(tmp_path / "png" / "train" / "Trouser" / "00001.png"))
    assert np.array_equal(first, FashionMNIST("train", fake_fmnist).pixels[1].numpy())  # image 1 is class 1
    # laid out padded to 32 px as the bundled set is; measured (PSNR) on the original 28x28 as the bundled set is
    write_layout(data, files)
    held_out, bundled = data.dataset("val", 32), FashionMNIST("test", fake_fmnist)
    assert crop_original(held_out[0][0], held_out).shape[-2:] == (28, 28)
    assert sorted(crop_original(held_out[i][0], held_out).sum().item() for i in range(64)) == pytest.approx(
        sorted(crop_original(bundled[i][0], bundled).sum().item() for i in range(64)))
    again = subprocess.run(script, capture_output=True, text=True)
    assert again.returncode == 2 and "was not written by ctfgen" in again.stderr
    assert len(list((tmp_path / "png" / "train").rglob("*.png"))) == 256  # the first export untouched


def test_presets_follow_the_number_of_images():
    """small with Fashion-MNIST's 60,000 images is the shipped schedule; fewer images shrink the codebook (16 tokens a
    codeword at least) and K with it; steps follow the epochs, with a floor; a --config value is checked by its key."""
    small = resolve("small", 60000, 10000, {})
    assert (small.tokenizer_steps, small.steps, small.codebook_size, small.k, small.eval_every, small.eval_items) == (
        3600, 4690, 4096, 128, 469, 2000)
    few = resolve("small", 200, 20, {})
    assert (few.codebook_size, few.k, few.steps, few.eval_items) == (512, 16, 1000, 20)  # 200 x 64 tokens / 16 -> 512
    assert resolve("small", 60000, 10000, {"batch_size": 32}).steps == 5 * 1875
    assert resolve("tiny", 27, 9, {"steps": 30.0}).steps == 30  # TOML's 30.0 is the whole number 30
    with pytest.raises(CtfgenError, match="steps must be a whole number"):
        resolve("tiny", 27, 9, {"steps": "30"})
    with pytest.raises(CtfgenError, match="stage1_model 'GPT-Q' is not one of"):
        resolve("tiny", 27, 9, {"stage1_model": "GPT-Q"})


def test_a_stop_signal_during_training_stops_the_fit_and_a_rerun_resumes(fitted, shapes, tmp_path, monkeypatch):
    """SIGINT (Ctrl-C) or SIGTERM in a training: the run checkpoints and the fit stops there (exit 130, one line
    saying where), the step not done, nothing after it run; the same command again resumes it and ends with the
    weights of a fit that was never stopped. (Before, the fit took the stopped tokenizer for a finished one.)"""
    from ctfgen.tokenizer import train as tokenizer_train

    learning_rate = send_signal_at_step(monkeypatch, tokenizer_train, signal.SIGINT)
    out = tmp_path / "stopped"
    status, stdout, stderr = run_fit("--data", shapes, "--out", out)
    steps = json.loads((out / "fit.json").read_text())["steps"]
    assert status == 130
    assert stderr.strip().splitlines()[-1].startswith(
        "ctfgen: interrupted: the tokenizer training stopped at step 2 of ")
    assert steps["tokenizer"]["state"] == "started" and "map" not in steps
    assert not (out / "coarse_map.safetensors").exists() and step_lines(stdout, "done in") == ["data"]

    monkeypatch.setattr(tokenizer_train, "learning_rate", learning_rate)
    status, stdout, stderr = run_fit("--data", shapes, "--out", out)
    assert status == 0, stderr
    assert step_lines(stdout, "resuming") == ["tokenizer"]
    resumed, straight = _weights(out / "pipeline"), _weights(fitted[0] / "pipeline")
    assert resumed.keys() == straight.keys()
    for name in resumed:
        assert torch.equal(resumed[name], straight[name]), name


def _weights(pipeline: Path) -> dict:
    return {f"{part}.{name}": tensor for part in ("tokenizer", "stage1", "stage2", "baseline")
            for name, tensor in load_weights(pipeline / part).items()}


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_gives_the_uninterrupted_weights(shapes, tmp_path):
    """Killed (SIGKILL) during the tokenizer's training, then during stage 1's; each rerun resumes the run from its
    last checkpoint, and the fit ends with the weights of a fit that was never interrupted."""
    config = tmp_path / "longer.toml"
    config.write_text("tokenizer_steps = 120\nsteps = 150\n")  # long enough to be killed in the middle
    args = ["--data", shapes, "--config", config]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "ctfgen.cli", "fit", "--preset", "tiny", "--no-progress", *map(str, args),
               "--out", str(out)]
    logs = []
    for run in ("tokenizer", "stage1"):
        logs.append(tmp_path / f"{run}.log")
        with open(logs[-1], "w") as log:
            proc = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        checkpoint = out / "runs" / run / "checkpoint" / "config.json"
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert json.loads((out / "fit.json").read_text())["steps"][run]["state"] == "started"  # killed mid-run
    assert step_lines(logs[1].read_text(), "resuming") == ["tokenizer"]
    status, stdout, stderr = run_fit(*args, "--out", out)
    assert status == 0, stderr
    assert step_lines(stdout, "resuming") == ["stage1"] and "tokenizer" in step_lines(stdout, "skipped")
    report = json.loads((out / "report.json").read_text())  # their times are those of the last, resumed, parts
    assert report["resumed"] == ["stage1", "tokenizer"]
    steps_table = (out / "report.md").read_text().split("## Steps")[1].split("##")[0]
    assert [line.endswith("(its last part: resumed) |") for line in steps_table.splitlines() if line[2:8] in (
        "tokeni", "stage1", "stage2")] == [True, True, False]

    status, _, stderr = run_fit(*args, "--out", tmp_path / "straight")
    assert status == 0, stderr
    killed, straight = _weights(out / "pipeline"), _weights(tmp_path / "straight" / "pipeline")
    assert killed.keys() == straight.keys()
    for name in killed:
        assert torch.equal(killed[name], straight[name]), name


@pytest.mark.slow
def test_fit_on_fashion_mnist_scores_fid_with_the_shipped_classifier(fake_fmnist, tmp_path, monkeypatch):
    """--data fmnist: the test split is the held-out set, and the shipped classifier's features give FID for CTF and
    the baseline (the synthetic Fashion-MNIST of the tests: 256 training and 64 test images)."""
    monkeypatch.setenv("CTFGEN_DATA", str(fake_fmnist))
    config = tmp_path / "short.toml"
    config.write_text("tokenizer_steps = 20\nsteps = 20\ngrid_per_class = 2\n")  # 32 px: 256 tokens a grid
    status, stdout, stderr = run_fit("--data", "fmnist", "--out", tmp_path / "run", "--config", config)
    assert status == 0, stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["data"]["n_train"], report["data"]["n_val"]) == (256, 64)
    for mode in ("ctf", "baseline"):
        scores = report["fid"][mode]
        assert scores["features"] == "fmnist" and scores["n_samples"] == 80 and scores["n_ref"] == 64
        assert np.isfinite(scores["fid"]) and scores["fid"] > 0
        assert 0 <= scores["accuracy"] <= 1  # the data's class ids matched to the classifier's
    assert "| ctf | fmnist | 80 | 64 |" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_torchrun_runs_the_heavy_steps_data_parallel(shapes, tmp_path):
    """Two processes (gloo on the CPU): the fit finishes, its pipeline loads, and a single-process rerun finds every
    step done (the fingerprints do not depend on the number of processes)."""
    out = tmp_path / "run"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "ctfgen.cli", "fit", "--preset", "tiny", "--no-progress", "--data", str(shapes), "--out",
                          str(out)], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert step_lines(two.stdout, "done in") == STEPS  # one line per step: only the main process speaks
    from ctfgen.pipeline import CTFPipeline

    assert CTFPipeline.from_pretrained(out / "pipeline").class_names == list(SHAPES)
    status, stdout, stderr = run_fit("--data", shapes, "--out", out)
    assert status == 0, stderr
    assert step_lines(stdout, "skipped") == STEPS
