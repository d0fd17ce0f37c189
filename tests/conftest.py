import gzip
import os
import struct

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tests run beside each other and beside DDP workers on 2 cores


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory):
    """A Fashion-MNIST-shaped IDX directory: 256 train / 64 test images of simple class shapes."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 64)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + c:26 - c, 4:24] = 120 + 10 * c
        images = np.clip(images + rng.integers(0, 20, images.shape), 0, 255)
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


def send_signal_at_step(monkeypatch, module, signum: int, at: int = 1):
    """Make `module`'s training loop send `signum` to this process at step `at` (its `learning_rate`, called once per
    step, does it): a stop arriving mid-run. Returns the original `learning_rate`, to put back for the resume."""
    learning_rate = module.learning_rate

    def stopping(step, *args):
        if step == at:
            os.kill(os.getpid(), signum)
        return learning_rate(step, *args)

    monkeypatch.setattr(module, "learning_rate", stopping)
    return learning_rate
