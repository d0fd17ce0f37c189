"""The shipped Fashion-MNIST pipeline (pretrained/fmnist) loads, its parts agree, and what it draws is
recognisable: the shipped classifier names the class that was asked for in most samples."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfgen.evaluation import extract_features, load_feature_network
from ctfgen.pipeline import CTFPipeline

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist"

# sha256 of the token grids of 4 images (classes 0..3, seed 0, default settings) of the shipped pipeline, with its
# transformers in float64 so that no CPU kind's float rounding (AVX2 / AVX-512 / AMX blocks matmuls differently)
# can flip a token: no change alters samples silently. After retraining or exporting the shipped weights (or a
# deliberate change to sampling), regenerate with `OMP_NUM_THREADS=1 .venv/bin/python tests/test_shipped.py` and
# paste its output here.
SAMPLE_SHA256 = {
    "ctf": "503a4c16141c0db0ea4c943e73b836931639ca476b7feb21391df6f5a9ad42c3",
    "baseline": "f92a48809ffb0832d35f8889a49259002da72cc664554275a4b2d3b4d1cad67d",
}


@pytest.fixture(scope="module")
def pipe():
    return CTFPipeline.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def classifier():
    return load_feature_network("fmnist", classifier=SHIPPED / "classifier")


def sample_checksums(pipe: CTFPipeline) -> dict[str, str]:
    exact = pipe.copy(torch.float64)
    return {mode: hashlib.sha256(exact(range(4), mode=mode, seed=0, output_type="np").tokens.numpy().tobytes())
            .hexdigest() for mode in SAMPLE_SHA256}


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


def test_shipped_samples_are_pinned(pipe):
    assert sample_checksums(pipe) == SAMPLE_SHA256, "samples changed: if on purpose, regenerate SAMPLE_SHA256"


if __name__ == "__main__":
    print(json.dumps(sample_checksums(CTFPipeline.from_pretrained(SHIPPED)), indent=4))
