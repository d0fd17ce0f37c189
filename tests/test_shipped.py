"""The shipped Fashion-MNIST pipeline (pretrained/fmnist) loads, its parts agree, and what it draws is
recognisable: the shipped classifier names the class that was asked for in most samples."""

import copy
import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfgen.evaluation import extract_features, load_feature_network
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import SamplingParams

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist"

# sha256 of the token grids of 4 images (classes 0..3, seed 0) of the shipped pipeline in each mode, and of the
# CTF images' stage-1 previews, with the default settings (SAMPLE_SHA256) and with every sampling setting changed
# (TUNED, TUNED_SHA256). The transformers and the previews' decoder run in float64 so that no CPU kind's float
# rounding (AVX2 / AVX-512 / AMX blocks matmuls differently) can flip a token or a pixel: no change alters samples
# silently. After retraining or exporting the shipped weights (or a deliberate change to sampling), regenerate with
# `OMP_NUM_THREADS=1 .venv/bin/python tests/test_shipped.py` and paste its output here.
SAMPLE_SHA256 = {
    "ctf": "e00bb1c5b902441020bd74efef961e7d27bc604c17c9ecef52bc5621ec92116e",
    "baseline": "f92a48809ffb0832d35f8889a49259002da72cc664554275a4b2d3b4d1cad67d",
    "ctf_preview": "4d50fbd265079b92a32293fc29c5d6c57c44b5a9722600fa21fd9811d67bfd46",
}
TUNED = {"sampling": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, cfg_scale=3.0),
         "stage2_sampling": SamplingParams(temperature=0.7, top_k=8)}
TUNED_SHA256 = {
    "ctf": "220043f6e3c466c1f221373a569cf70c7c25636104e500cae8e553c3995173d2",
    "baseline": "04ea6b023a7f56fc3eba77a58805e3a8bf1fadd6c8989e575befccf4ecf80896",
    "ctf_preview": "2ce492f5e041bed45d1a158ea8a1f99c81005c55f050050aae8a0b04a9324be3",
}


@pytest.fixture(scope="module")
def pipe():
    return CTFPipeline.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def classifier():
    return load_feature_network("fmnist", classifier=SHIPPED / "classifier")


def sample_checksums(pipe: CTFPipeline, **settings) -> dict[str, str]:
    exact = pipe.copy(torch.float64)
    out = {mode: exact(range(4), mode=mode, seed=0, output_type="pt", **settings) for mode in ("ctf", "baseline")}
    decoder = CTFPipeline(copy.deepcopy(pipe.tokenizer).double(), pipe.coarse_map, exact.stage1, exact.stage2)
    arrays = {mode: o.tokens for mode, o in out.items()} | {"ctf_preview": decoder.decode_preview(out["ctf"].coarse)}
    return {name: hashlib.sha256(array.numpy().tobytes()).hexdigest() for name, array in arrays.items()}


def test_shipped_parts_agree(pipe):
    assert pipe.num_classes == 10 and pipe.grid == 8 and pipe.coarse_map.k == 128
    assert pipe.class_names[0] == "T-shirt/top" and pipe.class_names[9] == "Ankle boot"
    assert pipe.stage1.config.vocab_size == 128 and pipe.baseline.config.vocab_size == 4096


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ctf", "baseline"])
def test_shipped_samples_are_recognisable(pipe, classifier, mode):
    labels = np.repeat(np.arange(10), 4)
    out = pipe(range(10), per_class=4, mode=mode, seed=0, preview=mode == "ctf", output_type="np")
    assert np.array_equal(out.labels, labels)
    accuracy = (extract_features(classifier, out.images).probs.argmax(1) == labels).mean()
    assert accuracy >= 0.6, accuracy  # ~85% over 10,000 samples (README); chance is 10%
    if mode == "ctf":
        assert len(out.previews) == len(labels) and not np.array_equal(out.previews, out.images)


@pytest.mark.parametrize("settings,pinned", [({}, SAMPLE_SHA256), (TUNED, TUNED_SHA256)], ids=["default", "tuned"])
def test_shipped_samples_are_pinned(pipe, settings, pinned):
    assert sample_checksums(pipe, **settings) == pinned, "samples changed: if on purpose, regenerate the checksums"


if __name__ == "__main__":
    shipped = CTFPipeline.from_pretrained(SHIPPED)
    for name, settings in (("SAMPLE_SHA256", {}), ("TUNED_SHA256", TUNED)):
        print(f"{name} = {json.dumps(sample_checksums(shipped, **settings), indent=4)}")


def test_the_shipped_schedule_is_the_recorded_one_and_parses(tmp_path):
    """scripts/shipped_schedule.sh, which the reproduce script and the experiments train with, gives `ctfgen train`
    the flags pretrained/fmnist/README.md records for the shipped transformers, and they parse; a run whose last
    snapshot exists is not started again."""
    from ctfgen.cli import build_parser

    def shipped_train(out: Path) -> None:
        script = f"source {SHIPPED.parents[1] / 'scripts/shipped_schedule.sh'}; shipped_train \"$1\" stage1 GPT-S " \
                 "runs/codes --map pretrained/fmnist/coarse_map_k128.safetensors"
        subprocess.run(["bash", "-c", script, "bash", str(out)], check=True, env=os.environ | {"CTFGEN": "echo"})

    shipped_train(tmp_path / "run")
    words = shlex.split((tmp_path / "run.log").read_text())
    build_parser().parse_args(words)  # exits (SystemExit) on a flag the CLI does not take
    recorded = shlex.split(re.search(r'^TRAIN="([^"]+)"$', (SHIPPED / "README.md").read_text(), re.M).group(1))
    assert words[words.index("--codes"):words.index("--out")] == recorded
    snapshot = tmp_path / "run/snapshots/step_0004690"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").touch()
    (tmp_path / "run.log").unlink()
    shipped_train(tmp_path / "run")
    assert not (tmp_path / "run.log").exists()
