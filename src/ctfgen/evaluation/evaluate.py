"""Scoring: sample features against reference statistics -> one JSON-ready dict.

`evaluate_npz` scores a sample file (ADM layout); `evaluate_floor` scores 10k training images
against the test split, the best any generator can reach with the same metrics.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctfgen.errors import CtfgenError
from ctfgen.evaluation.features import FeatureNetwork, Features, extract_features
from ctfgen.evaluation.metrics import frechet_distance, gaussian_stats, inception_score, precision_recall
from ctfgen.evaluation.npz import read_image_npz
from ctfgen.evaluation.reference import ReferenceStats, fmnist_uint8, load_reference


@dataclass
class EvalOptions:
    k: int = 3  # precision/recall neighbourhood
    pr_points: int = 10_000  # precision/recall on at most this many points of each set (fixed random subset)
    seed: int = 0
    is_splits: int = 10
    batch_size: int = 500
    per_class_fid: bool | None = None  # None: when the features have at most 512 dimensions


def _fid_or_none(a: tuple | None, b: tuple | None) -> float | None:
    if a is None or b is None or a[0] is None or b[0] is None:
        return None
    return frechet_distance(*a, *b)


def _class_names(network: FeatureNetwork) -> list[str] | None:
    if network.name == "fmnist":
        from ctfgen.data.datasets import FMNIST_CLASSES

        return list(FMNIST_CLASSES)
    return None


def _name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())  # "T-shirt/top" and a folder's "T-shirt_top" alike


def network_labels(labels: np.ndarray | None, class_names: list[str] | None,
                   network: FeatureNetwork) -> tuple[np.ndarray | None, str | None]:
    """The samples' class ids as the network's classes, and a note where they cannot be: a pipeline's class ids
    are its own (a folder's classes in sorted order), so where the samples name their classes, they are matched to
    the classifier's by name (case and punctuation aside). Without names the ids are taken as they are."""
    network_names = _class_names(network)
    if labels is None or class_names is None or network_names is None:
        return labels, None
    ids = {_name_key(name): i for i, name in enumerate(network_names)}
    mapped = [ids.get(_name_key(name)) for name in class_names]
    if None in mapped:
        return None, (f"no accuracy or per-class scores: the samples' classes ({', '.join(class_names[:4])}"
                      f"{', ...' if len(class_names) > 4 else ''}) are not the {network.name} classifier's")
    return np.asarray(mapped, dtype=np.int64)[labels], None


def per_class_breakdown(features: Features, labels: np.ndarray, ref: ReferenceStats, network: FeatureNetwork,
                        options: EvalOptions) -> list[dict]:
    """For every class asked for: how many samples, the classifier's accuracy on that class (when its
    outputs are the data's classes) and the FID against the reference images of that class."""
    want_fid = options.per_class_fid
    if want_fid is None:
        want_fid = features.pool.shape[1] <= 512
    names = _class_names(network)
    rows = []
    predicted = features.probs.argmax(axis=1)
    for c in np.unique(labels):
        mask = labels == c
        row = {"class": int(c)}
        if names and c < len(names):
            row["name"] = names[c]
        row["n"] = int(mask.sum())
        if network.labels_are_classes:
            row["accuracy"] = float((predicted[mask] == c).mean())
        if want_fid and ref.pool is not None and ref.labels is not None:
            ref_mask = ref.labels == c
            row["n_ref"] = int(ref_mask.sum())
            row["fid"] = None  # too few images of the class for a covariance, or a degenerate one
            if mask.sum() >= 2 and ref_mask.sum() >= 2:
                try:
                    row["fid"] = frechet_distance(*gaussian_stats(features.pool[mask]),
                                                  *gaussian_stats(ref.pool[ref_mask]))
                except CtfgenError:
                    pass
        rows.append(row)
    return rows


def score(features: Features, labels: np.ndarray | None, ref: ReferenceStats, network: FeatureNetwork,
          options: EvalOptions) -> dict:
    """Every metric of these sample features against the reference."""
    result = {"fid": _fid_or_none(gaussian_stats(features.pool), (ref.mu, ref.sigma))}
    if features.spatial is not None and ref.mu_s is not None:
        result["sfid"] = frechet_distance(*gaussian_stats(features.spatial), ref.mu_s, ref.sigma_s)
    else:
        result["sfid"] = None
    result["inception_score"], result["inception_score_std"] = inception_score(
        features.probs, splits=options.is_splits, seed=options.seed)
    if ref.pool is not None:
        pr = precision_recall(ref.pool, features.pool, k=options.k, max_points=options.pr_points, seed=options.seed)
        result |= {"precision": pr["precision"], "recall": pr["recall"], "k": pr["k"],
                   "pr_points": {"reference": pr["n_real"], "samples": pr["n_fake"]}}
    else:
        result |= {"precision": None, "recall": None}
    if labels is not None:
        if network.labels_are_classes:
            result["accuracy"] = float((features.probs.argmax(axis=1) == labels).mean())
        result["per_class"] = per_class_breakdown(features, labels, ref, network, options)
    return result


def _header(network: FeatureNetwork, ref: ReferenceStats) -> dict:
    return {"features": network.name, "feature_network": network.source, "feature_fingerprint": network.fingerprint,
            "ref": ref.name, "n_ref": ref.n, "reference_cache": ref.cache}


def evaluate_npz(samples, ref: str, network: FeatureNetwork, *, data_dir=None, cache=None, use_cache=True,
                 options: EvalOptions | None = None) -> dict:
    """Score the sample file `samples` (ADM layout) against reference `ref`."""
    tic = time.perf_counter()
    batch = read_image_npz(samples, what="samples")
    result = {"samples": str(Path(samples))}
    result |= evaluate_images(batch.images, batch.labels, ref, network, class_names=batch.class_names,
                              data_dir=data_dir, cache=cache, use_cache=use_cache, options=options,
                              where=f"samples file {samples}")
    result["seconds"] = round(time.perf_counter() - tic, 2)
    return result


def evaluate_images(images: np.ndarray, labels: np.ndarray | None, ref: str, network: FeatureNetwork, *,
                    class_names: list[str] | None = None, data_dir=None, cache=None, use_cache=True,
                    options: EvalOptions | None = None, what: str = "samples", where: str | None = None) -> dict:
    """Score uint8 images [N, H, W, 3] (with the class ids they were asked for, or None, and those classes' names
    where known: `network_labels`) against `ref`. `where` names the images in a refusal of their labels."""
    options = options or EvalOptions()
    network.check_images(images.shape, what)
    labels, note = network_labels(labels, class_names, network)
    network.check_labels(labels, where or what)
    reference = load_reference(ref, network, data_dir=data_dir, cache=cache, use_cache=use_cache,
                               batch_size=options.batch_size)
    features = extract_features(network, images, batch_size=options.batch_size, desc=what)
    result = {"n_samples": len(images), **_header(network, reference)}
    result |= score(features, labels, reference, network, options)
    if notes := reference.notes + ([note] if note else []):
        result["notes"] = notes
    return result


def evaluate_pipeline(pipe, network: FeatureNetwork, per_class: int, *, ref: str = "fmnist-test",
                      batch_size: int = 250, seed: int = 0, options: EvalOptions | None = None, **request) -> dict:
    """Sample `per_class` images of every class from a CTFPipeline, as `ctfgen sample --per-class` does for
    the same seed, and score them. `request`: the pipeline call's other arguments (mode, sampling,
    stage2_sampling, restrict)."""
    out = pipe(range(pipe.num_classes), per_class=per_class, batch_size=batch_size, seed=seed, output_type="np",
               progress=True, **request)
    return evaluate_images(out.images, out.labels, ref, network, class_names=pipe.class_names, options=options)


def evaluate_floor(network: FeatureNetwork, *, n: int = 10_000, ref: str = "fmnist-test", data_dir=None, cache=None,
                   use_cache=True, options: EvalOptions | None = None, tokenizer=None) -> dict:
    """Real vs real: `n` training images (a fixed random subset) scored like samples against `ref`. With a
    `tokenizer` (a VQModel), the images are first encoded and decoded by it: the floor that any generator over
    its tokens faces, since it can at best produce the reconstructions of real token grids."""
    options = options or EvalOptions()
    tic = time.perf_counter()
    from ctfgen.data.datasets import FashionMNIST

    total = len(FashionMNIST("train", data_dir=data_dir))
    index = np.sort(np.random.default_rng(options.seed).permutation(total)[:min(n, total)])
    images, labels = fmnist_uint8("train", data_dir, index=index)
    result = {"floor": True, "samples": f"fmnist-train ({len(index)} images, seed {options.seed})"}
    if tokenizer is not None:
        images = reconstruct_uint8(tokenizer, images, options.batch_size)
        result |= {"reconstruction": True, "tokenizer_fingerprint": tokenizer.fingerprint}
    result |= evaluate_images(images, labels, ref, network, data_dir=data_dir, cache=cache, use_cache=use_cache,
                              options=options, what="reconstructions" if tokenizer is not None else "training images")
    result["seconds"] = round(time.perf_counter() - tic, 2)
    return result


@torch.no_grad()
def reconstruct_uint8(tokenizer, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the tokenizer's reconstructions (encode to tokens, decode), same layout."""
    from ctfgen.data.datasets import to_uint8

    device = next(tokenizer.parameters()).device
    out = np.empty_like(images)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        out[i:i + batch_size] = to_uint8(tokenizer.decode(tokenizer.encode(x.to(device)))).permute(0, 2, 3, 1).cpu()
    return out
