"""The shipped Fashion-MNIST pipeline (pretrained/fmnist) loads, its parts agree, and what it draws is
recognisable: the shipped classifier names the class that was asked for in most samples."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ctfgen.evaluation import extract_features, load_feature_network
from ctfgen.pipeline import CTFPipeline

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist"

# sha256 of the uint8 pixels of 4 images (classes 0..3, seed 0, default settings) of the shipped pipeline, so
# that no change alters samples silently. After retraining or exporting the shipped weights (or a deliberate
# change to sampling), regenerate with `OMP_NUM_THREADS=1 .venv/bin/python tests/test_shipped.py` and paste
# its output here. Float rounding differs between CPU kinds (AVX2 / AVX-512 / AMX) and GPUs; these were
# made on the 2-core AVX2 development machine in fp32.
SAMPLE_SHA256 = {
    "ctf": "7720cd2ea5823074d33ef05e5c8842696714876ae67c4a3fc18279de5eeb342c",
    "baseline": "6d6bb5c33af19616f670583c68efbf91856bb6756af08b0797e4bd8030ac4bba",
}


@pytest.fixture(scope="module")
def pipe():
    return CTFPipeline.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def classifier():
    return load_feature_network("fmnist", classifier=SHIPPED / "classifier")


def sample_checksums(pipe: CTFPipeline) -> dict[str, str]:
    return {mode: hashlib.sha256(pipe(range(4), mode=mode, seed=0, output_type="np").images.tobytes()).hexdigest()
            for mode in SAMPLE_SHA256}


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
