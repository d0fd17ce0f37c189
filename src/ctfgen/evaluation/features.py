"""Feature networks: uint8 images in, pooled features, class probabilities and spatial features out.

Two are provided: `fmnist`, the project's small Fashion-MNIST classifier (see classifier.py), and
`inception`, the standard FID Inception-v3 (TensorFlow-compatible port from torch-fidelity), its
weights read from a local file and never downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctfgen.data.assets import pretrained_dir
from ctfgen.errors import CtfgenError

INCEPTION_WEIGHTS_ENV = "CTFGEN_INCEPTION_WEIGHTS"
INCEPTION_INSTALL_HINT = ("pip install --no-deps torch-fidelity  (ctfgen loads its Inception-v3 without torchvision; "
                          "or `pip install ctfgen[inception]` where torchvision works)")


@dataclass
class Features:
    """What a feature network says about N images."""

    pool: np.ndarray  # [N, D] float32: FID and precision/recall
    probs: np.ndarray  # [N, C] float32 softmax: Inception Score (and accuracy, for the fmnist classifier)
    spatial: np.ndarray | None = None  # [N, S] float32: sFID, where the network has spatial features

    def __len__(self) -> int:
        return len(self.pool)


class FeatureNetwork:
    """Base class: subclasses set the attributes and implement `forward` on a uint8 batch."""

    name: str = ""
    fingerprint: str = ""  # changes whenever the features could: keys the reference-statistics cache
    source: str = ""  # where the weights came from, for the report
    labels_are_classes: bool = False  # argmax of probs is a class id of the data (per-class accuracy)
    precomputed_dims: tuple[int, int] | None = None  # (pool, spatial) sizes of ADM reference-batch statistics
    num_classes: int | None = None  # where labels_are_classes: how many, so that other labels are refused
    device: torch.device = torch.device("cpu")

    def check_images(self, shape: tuple[int, ...], what: str) -> None:
        """Raise a CtfgenError when images of this [N, H, W, 3] shape cannot be scored."""

    def check_labels(self, labels: np.ndarray | None, what: str) -> None:
        """Refuse class labels this network has no class for (they would be scored as classes that do not exist)."""
        if labels is not None and self.num_classes is not None and len(labels) and labels.max() >= self.num_classes:
            raise CtfgenError(f"{what}: labels must be class ids below {self.num_classes} (the classes of the "
                              f"{self.name} classifier), found {labels.max()}")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B, H, W, 3] on self.device -> {"pool", "logits", optionally "spatial"}."""
        raise NotImplementedError


def file_digest(path: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(network: FeatureNetwork, images: np.ndarray, batch_size: int = 500,
                     desc: str = "features") -> Features:
    """Run the network over uint8 images [N, H, W, 3] in batches, with a progress bar."""
    network.check_images(images.shape, desc)
    pool, probs, spatial = [], [], []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None if len(starts) > 1 else True, leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(network.device)
        out = network.forward(batch)
        pool.append(out["pool"].float().cpu())
        probs.append(torch.softmax(out["logits"].double(), dim=1).float().cpu())
        if "spatial" in out:
            spatial.append(out["spatial"].float().cpu())
    return Features(pool=torch.cat(pool).numpy(), probs=torch.cat(probs).numpy(),
                    spatial=torch.cat(spatial).numpy() if spatial else None)


# --- the Fashion-MNIST classifier -----------------------------------------------------------------

class ClassifierFeatures(FeatureNetwork):
    """The project's Fashion-MNIST CNN: 128-d penultimate features, 10-way softmax, 448-d spatial."""

    name = "fmnist"
    labels_are_classes = True

    def __init__(self, directory, device: str | torch.device = "cpu"):
        from ctfgen.evaluation.classifier import FMNISTClassifier

        self.device = torch.device(device)
        self.model = FMNISTClassifier.from_pretrained(directory, device=self.device)
        self.num_classes = self.model.config.num_classes
        self.source = str(directory)
        self.fingerprint = "fmnist-" + file_digest(Path(directory) / "model.safetensors",
                                                   extra=(Path(directory) / "config.json").read_text())

    def check_images(self, shape, what):
        size = self.model.config.image_size
        if tuple(shape[1:]) != (size, size, 3):
            raise CtfgenError(f"the fmnist feature classifier takes {size}x{size}x3 images, but the {what} images "
                              f"are {'x'.join(map(str, shape[1:]))}; use --features inception for other sizes")

    def forward(self, images):
        from ctfgen.data.datasets import to_model_range

        return self.model.forward_features(to_model_range(images.permute(0, 3, 1, 2)))


# --- Inception-v3 (torch-fidelity) ----------------------------------------------------------------

def inception_extractor_class():
    """torch-fidelity's FeatureExtractorInceptionV3, imported without torchvision if need be.

    torch-fidelity's package __init__ imports every extractor, some of which need torchvision; its
    Inception-v3 module does not. Where the normal import fails, the package is registered without
    running its __init__ so that the Inception module alone can be imported.
    """
    module = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(module).FeatureExtractorInceptionV3
    except Exception:  # torchvision missing or broken: fall through to the bare import
        pass
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise CtfgenError(f"--features inception needs torch-fidelity, which is not installed: "
                          f"{INCEPTION_INSTALL_HINT}")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(module).FeatureExtractorInceptionV3
    except Exception as e:
        raise CtfgenError(f"cannot import torch-fidelity's Inception-v3 ({type(e).__name__}: {e}); "
                          f"reinstall it: {INCEPTION_INSTALL_HINT}") from None


def inception_weights_path(weights: str | os.PathLike | None) -> Path:
    """The local FID Inception weights: the argument, else $CTFGEN_INCEPTION_WEIGHTS; never a download."""
    weights = weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not weights:
        raise CtfgenError(f"--features inception needs the FID Inception-v3 weights as a local file "
                          f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth): pass --inception-weights "
                          f"FILE or set {INCEPTION_WEIGHTS_ENV}; ctfgen never downloads them")
    path = Path(weights)
    if not path.is_file():
        raise CtfgenError(f"Inception weights {path} not found; pass --inception-weights FILE or set "
                          f"{INCEPTION_WEIGHTS_ENV} to torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    return path


class InceptionFeatures(FeatureNetwork):
    """FID Inception-v3: pool_3 (2048), the 1008-way softmax of its unbiased logits (as ADM and
    torch-fidelity compute IS), and for sFID the first 7 channels of `mixed_6/conv` (Mixed_6d's 1x1
    branch, 17x17), flattened in (h, w, c) order as the ADM evaluator does: 2023 values."""

    name = "inception"
    labels_are_classes = False  # 1008 Inception classes, not the data's class ids
    precomputed_dims = (2048, 2023)  # an ADM reference batch's mu / mu_s were made with this network

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        path = inception_weights_path(weights)
        extractor = inception_extractor_class()
        try:  # check the file holds only tensors before torch-fidelity reads it (weights_only=False there)
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CtfgenError(f"{path} is not a PyTorch state dict of tensors ({type(e).__name__}); pass "
                              f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
        try:
            model = extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                              feature_extractor_weights_path=str(path))
        except RuntimeError as e:
            raise CtfgenError(f"{path} does not fit torch-fidelity's Inception-v3 ({str(e).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.source = str(path)
        self.fingerprint = "inception-" + file_digest(path, extra="torch-fidelity-inception-v3-compat")
        self._spatial = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1).float().clone()

    def forward(self, images):
        pool, logits = self.model(images.permute(0, 3, 1, 2).contiguous())
        return {"pool": pool, "logits": logits, "spatial": self._spatial}


def load_feature_network(name: str, *, classifier=None, inception_weights=None, device="cpu") -> FeatureNetwork:
    if name == "fmnist":
        return ClassifierFeatures(classifier or pretrained_dir() / "fmnist" / "classifier", device=device)
    if name == "inception":
        return InceptionFeatures(inception_weights, device=device)
    raise CtfgenError(f"unknown feature network {name!r}; use fmnist or inception")
