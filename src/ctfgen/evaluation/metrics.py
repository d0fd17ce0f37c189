"""The numbers: Frechet distance, Inception Score, and k-NN precision / recall.

Pure functions of feature arrays, independent of any network. They follow the ADM evaluator
(guided-diffusion `evaluations/evaluator.py`) and pytorch-fid, so figures are comparable.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from ctfgen.errors import CtfgenError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as np.cov) of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise CtfgenError(f"need at least 2 feature vectors for a covariance, got array of shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with pytorch-fid's / ADM's handling of a
    singular product (retry with eps on the diagonal) and of round-off imaginary parts."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise CtfgenError(f"statistics do not match: mean {mu1.shape} vs {mu2.shape}, covariance {sigma1.shape} vs "
                          f"{sigma2.shape}; were they made with the same feature network?")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below, as pytorch-fid / ADM do
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise CtfgenError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in the matrix "
                              "square root; the covariances are degenerate (too few images for the feature dimension?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), the mean and standard deviation over `splits` parts.

    The rows are shuffled with a fixed seed before splitting (as torch-fidelity does): sample files
    are often ordered by class, and a part holding a single class would score about 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise CtfgenError(f"inception score needs class probabilities [N, C], got shape {probs.shape}")
    splits = max(1, min(splits, len(probs)))
    probs = probs[np.random.default_rng(seed).permutation(len(probs))]
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def subsample(features: np.ndarray, max_points: int | None, seed: int = 0) -> np.ndarray:
    """At most `max_points` rows, a fixed random subset (the same for the same N and seed)."""
    if max_points is None or len(features) <= max_points:
        return features
    index = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
    return features[index]


def _by_row_chunks(rows: torch.Tensor, cols: torch.Tensor, fn, chunk: int) -> torch.Tensor:
    return torch.cat([fn(torch.cdist(rows[i:i + chunk], cols)) for i in range(0, len(rows), chunk)])


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1000) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    if len(features) <= k:
        raise CtfgenError(f"precision/recall with k = {k} needs more than {k} points, got {len(features)}")
    # The smallest distance of a row is the point itself (0): the (k+1)-th smallest is the k-th neighbour.
    return _by_row_chunks(features, features, lambda d: d.kthvalue(k + 1, dim=1).values, chunk)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = _by_row_chunks(points, centres, lambda d: (d <= radii[None, :]).any(dim=1), chunk)
    return int(inside.sum()) / len(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, max_points: int | None = 10_000,
                     seed: int = 0, chunk: int = 1000) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Precision: the fraction of generated points within the k-NN radius of some real point.
    Recall: the fraction of real points within the k-NN radius of some generated point.
    Each set is first cut to a fixed random subset of at most `max_points` (fixed seed).
    """
    real = torch.from_numpy(np.ascontiguousarray(subsample(real, max_points, seed), dtype=np.float32))
    fake = torch.from_numpy(np.ascontiguousarray(subsample(fake, max_points, seed + 1), dtype=np.float32))
    if real.shape[1] != fake.shape[1]:
        raise CtfgenError(f"features differ in size: {real.shape[1]} (reference) vs {fake.shape[1]} (samples)")
    real_radii, fake_radii = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    return {"precision": _coverage(fake, real, real_radii, chunk), "recall": _coverage(real, fake, fake_radii, chunk),
            "k": k, "n_real": len(real), "n_fake": len(fake)}
