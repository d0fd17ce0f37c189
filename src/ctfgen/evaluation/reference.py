"""Reference sets and their cached statistics.

A reference is `fmnist-test` / `fmnist-train` (the bundled data, exactly as the generator sees it:
28x28 padded to 32x32, 3 channels, uint8) or an ADM-layout `.npz` (arr_0 images, optional labels,
optional precomputed mu / sigma / mu_s / sigma_s). Its features are computed once per (feature
network, data) pair and cached under $CTFGEN_CACHE or ~/.cache/ctfgen (eval-stats/), so scoring
another sample file reads them back instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctfgen.errors import CtfgenError
from ctfgen.evaluation.features import FeatureNetwork, extract_features, file_digest
from ctfgen.evaluation.metrics import gaussian_stats
from ctfgen.evaluation.npz import read_image_npz
from ctfgen.files import WriteRefused, write_atomic

CACHE_VERSION = 1  # bump when the cached content or the way it is computed changes
FMNIST_REFS = {"fmnist-test": "test", "fmnist-train": "train"}


@dataclass
class ReferenceStats:
    name: str
    n: int  # images behind the statistics
    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None = None  # [N, D] features for precision/recall and per-class FID
    labels: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    cache: str = "off"  # "hit", "miss" (computed and stored) or "off"


def cache_dir(directory=None) -> Path:
    """Where statistics are cached: the argument, else $CTFGEN_CACHE, else ~/.cache/ctfgen."""
    if directory:
        return Path(directory)
    return Path(os.environ.get("CTFGEN_CACHE") or Path.home() / ".cache" / "ctfgen")


def fmnist_uint8(split: str, data_dir=None, index=None, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images as the generator sees them, in sample-file form: uint8 [N, 32, 32, 3]."""
    from ctfgen.data.datasets import FashionMNIST, to_uint8

    dataset = FashionMNIST(split, data_dir=data_dir)
    index = torch.arange(len(dataset)) if index is None else torch.as_tensor(index)
    images = np.empty((len(index), 32, 32, 3), np.uint8)
    for i in range(0, len(index), chunk):
        images[i:i + chunk] = to_uint8(dataset.images(index[i:i + chunk])).permute(0, 2, 3, 1).numpy()
    return images, dataset.labels[index].numpy()


def fmnist_fingerprint(split: str, data_dir=None) -> str:
    from ctfgen.data.datasets import FMNIST_FILES, FMNIST_PAD, find_idx, fmnist_dir

    root = fmnist_dir(data_dir)
    digests = [file_digest(find_idx(root, stem)) for stem in FMNIST_FILES[split]]
    return hashlib.sha256(f"fmnist-{split}-pad{FMNIST_PAD}-{'-'.join(digests)}".encode()).hexdigest()[:16]


def _load_cached(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None  # unreadable: recompute and overwrite
    if int(arrays.get("version", -1)) != CACHE_VERSION:
        return None
    return arrays


def _store(path: Path, arrays: dict) -> None:
    def write(tmp):
        buffer = io.BytesIO()
        np.savez(buffer, version=np.int64(CACHE_VERSION), **{k: v for k, v in arrays.items() if v is not None})
        Path(tmp).write_bytes(buffer.getvalue())

    try:
        write_atomic(path, write)
    except WriteRefused as e:  # a read-only or full cache is not fatal: the figures are still right
        warnings.warn(f"reference statistics not cached: {e}", stacklevel=2)


def _compute(network: FeatureNetwork, images: np.ndarray, labels, batch_size: int, name: str) -> dict:
    features = extract_features(network, images, batch_size=batch_size, desc=f"reference {name}")
    mu, sigma = gaussian_stats(features.pool)
    arrays = {"mu": mu, "sigma": sigma, "pool": features.pool, "labels": labels}
    if features.spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = gaussian_stats(features.spatial)
    return arrays


def load_reference(ref: str, network: FeatureNetwork, *, data_dir=None, cache=None, use_cache: bool = True,
                   batch_size: int = 500) -> ReferenceStats:
    """The statistics of reference `ref` under `network`, from the cache when they are there."""
    stats, has_images = {}, True
    if ref in FMNIST_REFS:
        split = FMNIST_REFS[ref]
        data_key = fmnist_fingerprint(split, data_dir)

        def load_images():
            return fmnist_uint8(split, data_dir)
    elif ref.startswith("fmnist"):
        raise CtfgenError(f"unknown reference {ref!r}; use {', '.join(FMNIST_REFS)} or an ADM-layout .npz file")
    else:
        path = Path(ref)
        batch = read_image_npz(path, what="reference", allow_stats_only=True)
        stats = batch.stats
        data_key = file_digest(path, extra="npz")
        has_images = batch.images is not None

        def load_images():
            return batch.images, batch.labels

        if has_images:
            network.check_images(batch.images.shape, "reference")
            network.check_labels(batch.labels, f"reference file {path}")

    notes = []
    precomputed = {}
    if stats:
        dims = (len(stats["mu"]), len(stats["mu_s"]) if "mu_s" in stats else None)
        if network.precomputed_dims and dims[0] == network.precomputed_dims[0] and \
                dims[1] in (None, network.precomputed_dims[1]):
            precomputed = stats
            notes.append("FID/sFID use the reference file's precomputed statistics (ADM reference batch)")
        elif has_images:
            notes.append(f"the reference file's precomputed statistics ({dims[0]}-d) are not {network.name} "
                         "features: recomputed from its images")
    if precomputed and not has_images:
        notes.append("the reference file has statistics but no images: no precision/recall or per-class figures")
        return ReferenceStats(ref, 0, precomputed["mu"], precomputed["sigma"], mu_s=precomputed.get("mu_s"),
                              sigma_s=precomputed.get("sigma_s"), notes=notes)
    if not precomputed and not has_images:
        raise CtfgenError(f"reference {ref} has no images (arr_0) and no statistics usable with the {network.name} "
                          f"features; score against an .npz with arr_0 images")

    path = cache_dir(cache) / "eval-stats" / f"{network.fingerprint}-{data_key}.npz"
    arrays = _load_cached(path) if use_cache and path.is_file() else None
    state = "hit" if arrays is not None else ("miss" if use_cache else "off")
    if arrays is None:
        images, labels = load_images()
        arrays = _compute(network, images, labels, batch_size, ref)
        if use_cache:
            _store(path, arrays)
    labels = arrays.get("labels")
    result = ReferenceStats(ref, len(arrays["pool"]), arrays["mu"], arrays["sigma"], pool=arrays["pool"],
                            labels=labels, mu_s=arrays.get("mu_s"), sigma_s=arrays.get("sigma_s"), notes=notes,
                            cache=state)
    if precomputed:
        result.mu, result.sigma = precomputed["mu"], precomputed["sigma"]
        if "mu_s" in precomputed:
            result.mu_s, result.sigma_s = precomputed["mu_s"], precomputed["sigma_s"]
    return result
