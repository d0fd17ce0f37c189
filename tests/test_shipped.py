"""The shipped Fashion-MNIST pipeline (pretrained/fmnist) loads, its parts agree, and what it draws is
recognisable: the shipped classifier names the class that was asked for in most samples."""

from pathlib import Path

import numpy as np
import pytest

from ctfgen.evaluation import extract_features, load_feature_network
from ctfgen.pipeline import CTFPipeline

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist"


@pytest.fixture(scope="module")
def pipe():
    return CTFPipeline.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def classifier():
    return load_feature_network("fmnist", classifier=SHIPPED / "classifier")


def test_shipped_parts_agree(pipe):
    assert pipe.num_classes == 10 and pipe.grid == 8 and pipe.coarse_map.k == 128
    assert pipe.class_names[0] == "T-shirt/top" and pipe.class_names[9] == "Ankle boot"
    assert pipe.stage1.config.vocab_size == 128 and pipe.baseline.config.vocab_size == 4096


@pytest.mark.parametrize("mode", ["ctf", "baseline"])
def test_shipped_samples_are_recognisable(pipe, classifier, mode):
    labels = np.repeat(np.arange(10), 4)
    out = pipe(labels.tolist(), mode=mode, seed=0, preview=mode == "ctf")
    images = out.pixels.permute(0, 2, 3, 1).numpy()
    accuracy = (extract_features(classifier, images).probs.argmax(1) == labels).mean()
    assert accuracy >= 0.6, accuracy  # ~85% over 10,000 samples (README); chance is 10%
    if mode == "ctf":
        assert len(out.previews) == len(labels) and not np.array_equal(out.preview_pixels.numpy(), out.pixels.numpy())
