"""Saving loses nothing unless a cast is asked for (issue 24): a saved and reloaded pipeline, or part, draws the same
tokens for a seed; a cast that rounds says what it cast, from what to what."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ctfgen import cli
from ctfgen.evaluation.classifier import ClassifierConfig, FMNISTClassifier
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner
from ctfgen.pipeline import CTFPipeline
from ctfgen.tokenizer.model import VQModel
from test_pipeline import make_parts

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist"
MODELS = ("tokenizer", "stage1", "stage2", "baseline")
REQUEST = dict(classes=[0, 3, 7], per_class=2, seed=4, output_type="pt")  # the request


def file_dtypes(directory) -> set[str]:
    with safe_open(str(Path(directory) / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[name], right[name]) for name in left)


def tokens(pipe: CTFPipeline, mode: str) -> torch.Tensor:
    request = dict(REQUEST)
    return pipe(request.pop("classes"), mode=mode, **request).tokens


@pytest.fixture(scope="module")
def shipped():
    return CTFPipeline.from_pretrained(SHIPPED)


@pytest.mark.parametrize("build", ["shipped fp16", "fresh fp32"])
def test_a_saved_pipeline_loads_as_the_same_pipeline(shipped, build, tmp_path):
    pipe = shipped if build == "shipped fp16" else CTFPipeline(**make_parts())
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = CTFPipeline.from_pretrained(tmp_path / "pipe")
    expected = {"F16"} if build == "shipped fp16" else {"F32"}
    for name in MODELS:
        assert file_dtypes(tmp_path / "pipe" / name) == expected, name
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    for mode in ("ctf", "baseline"):
        assert torch.equal(tokens(loaded, mode), tokens(pipe, mode)), mode


@pytest.mark.parametrize("cls", [VQModel, GPT, Refiner, FMNISTClassifier])
def test_each_part_saves_as_it_is_or_as_it_was_loaded(cls, tmp_path):
    parts = make_parts() | {"classifier": FMNISTClassifier(ClassifierConfig(channels=(4, 8), hidden=8))}
    name = {VQModel: "tokenizer", GPT: "stage1", Refiner: "stage2", FMNISTClassifier: "classifier"}[cls]
    model = parts[name]
    model.save_pretrained(tmp_path / "fp32")  # a fresh model: fp32, every bit
    assert file_dtypes(tmp_path / "fp32") <= {"F32", "I64"}
    assert_same_weights(cls.from_pretrained(tmp_path / "fp32"), model)

    with pytest.warns(UserWarning, match="the cast to fp16 asked for rounded"):
        model.save_pretrained(tmp_path / "fp16", dtype="fp16")  # as shipped
    half = cls.from_pretrained(tmp_path / "fp16")
    half.save_pretrained(tmp_path / "again")  # loaded from fp16: saved in fp16 again, exactly
    assert file_dtypes(tmp_path / "again") == file_dtypes(tmp_path / "fp16")
    assert_same_weights(cls.from_pretrained(tmp_path / "again"), half)

    weight = next(p for p in half.parameters() if p.dim() > 1)
    with torch.no_grad():
        weight.add_(1e-4)  # changed since it was loaded (fine-tuned): fp16 no longer holds it
    half.save_pretrained(tmp_path / "tuned")
    assert_same_weights(cls.from_pretrained(tmp_path / "tuned"), half)


def test_a_cast_that_rounds_says_what_it_cast(tmp_path):
    model = make_parts()["stage1"]
    with pytest.warns(UserWarning, match=r"the cast to bf16 asked for rounded \d+ fp32 weight tensors"):
        model.save_pretrained(tmp_path / "bf16", dtype="bf16")
    assert file_dtypes(tmp_path / "bf16") == {"BF16"}
    loaded = GPT.from_pretrained(tmp_path / "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 values cast to bf16 again: nothing rounded, nothing said
        loaded.save_pretrained(tmp_path / "again", dtype="bf16")


@pytest.fixture(scope="module")
def fp16_parts(tmp_path_factory):
    """The parts of make_parts(), exported to fp16 as shipped: checkpoints for `ctfgen export` and `assemble`."""
    root = tmp_path_factory.mktemp("fp16")
    parts = make_parts()
    parts["coarse_map"].save(root / "map.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rounding, said (test_a_cast_that_rounds_says_what_it_cast)
        for name in MODELS:
            parts[name].save_pretrained(root / name, dtype="fp16")
    return root


def test_export_keeps_the_weights_unless_a_cast_is_asked_for(fp16_parts, tmp_path, capsys):
    fresh = make_parts()["stage2"]
    fresh.save_pretrained(tmp_path / "fp32")
    for source, stored in ((tmp_path / "fp32", "fp32"), (fp16_parts / "stage2", "fp16")):
        out = tmp_path / f"export-{stored}"
        assert cli.main(["export", str(source), str(out)]) == 0
        assert f"(weights as stored: {stored})" in capsys.readouterr().out
        assert file_dtypes(out) == file_dtypes(source)
        assert_same_weights(Refiner.from_pretrained(out), Refiner.from_pretrained(source))
    # A cast asked for: the line on stdout names it, and one line on stderr (as a user sees it) what it rounded.
    proc = subprocess.run([sys.executable, "-m", "ctfgen.cli", "export", str(tmp_path / "fp32"), str(tmp_path / "bf16"),
                           "--dtype", "bf16"], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "(weights cast to bf16)" in proc.stdout, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("ctfgen: warning:"), proc.stderr
    assert re.search(r"cast to bf16 asked for rounded \d+ fp32 weight tensors", proc.stderr), proc.stderr
    assert file_dtypes(tmp_path / "bf16") == {"BF16"}


def test_assemble_keeps_the_weights_of_its_parts(fp16_parts, tmp_path, capsys):
    parts = ["--map", fp16_parts / "map.safetensors", *(a for n in ("stage1", "stage2", "baseline")
                                                         for a in (f"--{n}", fp16_parts / n))]
    argv = ["assemble", "--out", tmp_path / "pipe", "--tokenizer", fp16_parts / "tokenizer", *parts]
    assert cli.main([str(arg) for arg in argv]) == 0
    assert "(weights as stored: fp16)" in capsys.readouterr().out
    assembled = CTFPipeline.from_pretrained(tmp_path / "pipe")
    by_hand = CTFPipeline(VQModel.from_pretrained(fp16_parts / "tokenizer"), assembled.coarse_map,
                          *(cls.from_pretrained(fp16_parts / n) for cls, n in ((GPT, "stage1"), (Refiner, "stage2"),
                                                                              (GPT, "baseline"))))
    for name in MODELS:
        assert file_dtypes(tmp_path / "pipe" / name) == {"F16"}
        assert_same_weights(getattr(assembled, name), getattr(by_hand, name))
    assert torch.equal(tokens(assembled, "ctf"), tokens(by_hand, "ctf"))
