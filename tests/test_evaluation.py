"""Evaluation: the metrics against direct, independent computations; sample files refused with one
line; the reference-statistics cache; per-class figures; the shipped classifier's accuracy."""

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ctfgen.cli import main
from ctfgen.data.assets import pretrained_dir
from ctfgen.evaluation import evaluate_npz, frechet_distance, gaussian_stats, inception_score, precision_recall
from ctfgen.evaluation import reference as reference_module
from ctfgen.evaluation.classifier import ClassifierConfig, FMNISTClassifier, augment
from ctfgen.evaluation.features import FeatureNetwork
from ctfgen.evaluation.image_metrics import psnr_per_image, ssim_per_image
from ctfgen.evaluation.reference import fmnist_uint8
from installed import require


def error_line(capsys) -> str:
    """The one `ctfgen: error:` line a failed command prints, and nothing else on stderr."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ctfgen: error:") and "Traceback" not in err, repr(err)
    return err.strip()

# --- metrics vs direct computations ------------------------------------------------------------


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm, on raw features."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def eigen_fid(a: np.ndarray, b: np.ndarray) -> float:
    """No sqrtm at all: Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * root)


def test_fid_matches_scipy_formula_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    ours = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert ours == pytest.approx(direct_fid(a, b), rel=1e-9)
    assert ours == pytest.approx(eigen_fid(a, b), rel=1e-6)
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(a)) == pytest.approx(0, abs=1e-6)


def test_fid_of_rank_deficient_covariances_is_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(7, 10)) + 1  # fewer points than dimensions
    assert np.isfinite(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)))


def test_fid_refuses_mismatched_statistics():
    with pytest.raises(Exception, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def direct_is(probs: np.ndarray) -> float:
    marginal = probs.mean(0)
    return float(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in probs])))


def test_inception_score_matches_direct_formula():
    probs = np.random.default_rng(2).dirichlet(np.full(10, 0.3), size=200)
    mean, std = inception_score(probs, splits=1)
    assert mean == pytest.approx(direct_is(probs), rel=1e-9) and std == 0
    # several parts: the mean over a fixed shuffle's consecutive parts
    order = np.random.default_rng(0).permutation(200)
    parts = [direct_is(part) for part in np.array_split(probs[order], 4)]
    assert inception_score(probs, splits=4, seed=0) == pytest.approx((np.mean(parts), np.std(parts)), rel=1e-9)


def test_inception_score_extremes_and_class_ordered_files():
    one_hot = np.eye(10)[np.repeat(np.arange(10), 50)]  # ordered by class, as `ctfgen sample` writes them
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(10)
    assert inception_score(one_hot, splits=10)[0] > 9  # shuffled before splitting: not ~1 per single-class part
    assert inception_score(np.full((100, 10), 0.1), splits=5)[0] == pytest.approx(1.0)


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dist(x, y):
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))

    real_radii = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean([(dist(f[None], real)[0] <= real_radii).any() for f in fake])
    recall = np.mean([(dist(r[None], fake)[0] <= fake_radii).any() for r in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_knn(k):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(80, 6))
    fake = rng.normal(size=(70, 6)) * 0.6 + 0.4  # a narrower, shifted cloud: precision high, recall low
    result = precision_recall(real, fake, k=k, max_points=None, chunk=9)
    expected = brute_force_pr(real, fake, k)
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-12)
    assert result["precision"] > result["recall"]


def test_precision_recall_uses_a_fixed_subset():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(300, 4)), rng.normal(size=(250, 4))
    first = precision_recall(real, fake, max_points=100, seed=5)
    assert (first["n_real"], first["n_fake"]) == (100, 100)
    assert precision_recall(real, fake, max_points=100, seed=5) == first
    full = precision_recall(real, fake, max_points=None)
    assert (full["n_real"], full["n_fake"]) == (300, 250)


# --- per-image fidelity: PSNR and SSIM ------------------------------------------------------------


def test_psnr_by_hand():
    """Constant images 10 apart: MSE 100; images that differ by 255 in half their pixels: MSE 255^2 / 2."""
    a = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] = 110
    a[1], b[1, :, :4], b[1, :, 4:] = 0, 255, 0
    expected = [10 * np.log10(255**2 / 100), 10 * np.log10(2)]
    np.testing.assert_allclose(psnr_per_image(a, b).double().numpy(), expected, rtol=1e-6)


def ssim_by_formula(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM as Wang et al. (2004) define it, written out in numpy float64: at each position where the 11x11 window
    (Gaussian weights w, sigma 1.5, summing to 1) fits, the weighted means, variances and covariance of the
    pixels under it, (2 mx my + C1) (2 sxy + C2) / ((mx^2 + my^2 + C1) (sx^2 + sy^2 + C2)) with C1 = (0.01 * 255)^2,
    C2 = (0.03 * 255)^2; averaged over positions and channels, one value per image of uint8 [B, C, H, W]."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = np.lib.stride_tricks.sliding_window_view(a.astype(np.float64), (11, 11), axis=(2, 3))  # [B, C, h, w, 11, 11]
    y = np.lib.stride_tricks.sliding_window_view(b.astype(np.float64), (11, 11), axis=(2, 3))

    def mean(t):
        return (t * w).sum((-1, -2))

    mx, my = mean(x), mean(y)
    dx, dy = x - mx[..., None, None], y - my[..., None, None]
    ssim = ((2 * mx * my + c1) * (2 * mean(dx * dy) + c2)) / ((mx**2 + my**2 + c1) * (mean(dx**2) + mean(dy**2) + c2))
    return ssim.mean((1, 2, 3))


def test_ssim_by_hand_and_by_its_formula():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    noisier = np.clip(noise + rng.integers(-60, 60, noise.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.broadcast_to(120 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0), (3, 32, 32))
    shaded = np.stack([smooth, smooth + 10 * (xx % 3)]).astype(np.uint8)
    shifted = np.stack([np.roll(smooth, 1, axis=2) * 0.8 + 20, smooth * 1.1]).clip(0, 255).astype(np.uint8)
    for a, b in ((noise, noisier), (shaded, shifted)):
        np.testing.assert_allclose(ssim_per_image(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                                   ssim_by_formula(a, b), rtol=0, atol=1e-12)
    # By hand: an image against itself scores 1; constant images 100 and 110 have no variance, so only the mean
    # term is left, (2 * 100 * 110 + C1) / (100^2 + 110^2 + C1).
    np.testing.assert_allclose(ssim_per_image(torch.from_numpy(shaded), torch.from_numpy(shaded)).numpy(), 1.0,
                               rtol=0, atol=1e-12)
    c1 = (0.01 * 255) ** 2
    constant = ssim_per_image(torch.full((1, 3, 16, 16), 100, dtype=torch.uint8),
                              torch.full((1, 3, 16, 16), 110, dtype=torch.uint8))
    np.testing.assert_allclose(constant.numpy(), (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), rtol=1e-12)


# --- the feature classifier -------------------------------------------------------------------


def test_augment_keeps_shape_and_only_shifts():
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    out = augment(images, shift=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(augment(images, 0, False, torch.Generator()), images)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clf") / "classifier"
    FMNISTClassifier(ClassifierConfig(channels=(4, 8, 8), hidden=8)).save_pretrained(directory)
    return directory


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("CTFGEN_CACHE", str(directory))
    return directory


@pytest.fixture(scope="module")
def fake_samples(fake_fmnist, tmp_path_factory):
    """The fake training images as a labelled sample file (ADM layout, 32x32x3 uint8)."""
    images, labels = fmnist_uint8("train", fake_fmnist)
    return write_npz(tmp_path_factory.mktemp("samples") / "samples.npz", arr_0=images, labels=labels)


def run_eval(capsys, *args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- sample files refused with one line --------------------------------------------------------

BAD_SAMPLES = {
    "float pixels": (dict(arr_0=np.zeros((4, 32, 32, 3), np.float32)), "not uint8"),
    "grey [N,H,W]": (dict(arr_0=np.zeros((4, 32, 32), np.uint8)), "not [N, H, W, 3]"),
    "channels first": (dict(arr_0=np.zeros((4, 3, 32, 32), np.uint8)), "not [N, H, W, 3]"),
    "no arr_0": (dict(images=np.zeros((4, 32, 32, 3), np.uint8)), "no images"),
    "zero images": (dict(arr_0=np.zeros((0, 32, 32, 3), np.uint8)), "holds no images"),
    "object array": (dict(arr_0=np.array([None, 1], dtype=object)), "Python objects"),
    "labels of the wrong length": (dict(arr_0=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(3, np.int64)),
                                   "labels must be"),
    "wrong image size": (dict(arr_0=np.zeros((4, 28, 28, 3), np.uint8)), "takes 32x32x3 images"),
    "fewer class names than classes": (dict(arr_0=np.zeros((4, 32, 32, 3), np.uint8), labels=np.arange(4),
                                            class_names=np.array(["a", "b"])), "class_names must be"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_file_refused_with_one_line(case, tiny_classifier, fake_fmnist, cache, tmp_path, capsys):
    arrays, message = BAD_SAMPLES[case]
    path = write_npz(tmp_path / "bad.npz", **arrays)
    code = main(["eval", "--samples", str(path), "--classifier", str(tiny_classifier), "--data-dir", str(fake_fmnist)])
    assert code == 2
    line = error_line(capsys)
    assert message in line
    assert str(path) in line or case == "wrong image size"


def test_missing_and_non_npz_sample_files_refused(tiny_classifier, tmp_path, capsys):
    assert main(["eval", "--samples", str(tmp_path / "nope.npz"), "--classifier", str(tiny_classifier)]) == 2
    assert "not found" in error_line(capsys)
    (tmp_path / "text.npz").write_text("not an archive")
    assert main(["eval", "--samples", str(tmp_path / "text.npz"), "--classifier", str(tiny_classifier)]) == 2
    assert "not an .npz archive" in error_line(capsys)


def test_eval_needs_samples_or_floor(capsys):
    assert main(["eval"]) == 2
    assert "--samples" in error_line(capsys)


def test_missing_classifier_is_one_line(tmp_path, fake_samples, capsys):
    assert main(["eval", "--samples", str(fake_samples), "--classifier", str(tmp_path / "none")]) == 2
    assert "train-classifier" in error_line(capsys)


# --- scoring, the cache, per-class figures ---------------------------------------------------------


def test_eval_scores_and_caches_the_reference(tiny_classifier, fake_fmnist, fake_samples, cache, monkeypatch, capsys):
    calls = []
    original = reference_module.extract_features

    def counting(network, images, **kwargs):
        calls.append(len(images))
        return original(network, images, **kwargs)

    monkeypatch.setattr(reference_module, "extract_features", counting)
    args = ["--samples", str(fake_samples), "--classifier", str(tiny_classifier), "--data-dir", str(fake_fmnist)]
    first = run_eval(capsys, *args)
    assert calls == [64] and first["reference_cache"] == "miss"
    assert len(list((cache / "eval-stats").glob("*.npz"))) == 1
    second = run_eval(capsys, *args)
    assert calls == [64], "the reference features were recomputed despite the cache"
    assert second["reference_cache"] == "hit"
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "accuracy"):
        assert second[key] == pytest.approx(first[key], rel=1e-6), key
    assert first["n_samples"] == 256 and first["n_ref"] == 64 and first["features"] == "fmnist"
    assert first["fid"] >= 0 and first["sfid"] >= 0 and 1 <= first["inception_score"] <= 10
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1
    # another feature network (here: other weights) is another cache entry
    other = tiny_classifier.parent / "other"
    torch.manual_seed(1)
    FMNISTClassifier(ClassifierConfig(channels=(4, 8, 8), hidden=8)).save_pretrained(other)
    third = run_eval(capsys, "--samples", str(fake_samples), "--classifier", str(other), "--data-dir", str(fake_fmnist))
    assert third["reference_cache"] == "miss" and calls == [64, 64]
    # --no-cache recomputes and stores nothing new
    run_eval(capsys, *args, "--no-cache")
    assert calls == [64, 64, 64] and len(list((cache / "eval-stats").glob("*.npz"))) == 2


def test_samples_naming_their_classes_are_matched_to_the_classifiers(tiny_classifier, fake_fmnist, fake_samples,
                                                                    cache, tmp_path, capsys):
    """A pipeline fitted on a folder numbers its classes in the folder names' order: `ctfgen eval` maps them to the
    classifier's by name (the same accuracy and per-class rows as with the classifier's own ids), and where the
    names are not the classifier's, it gives no accuracy and says why; FID needs no classes."""
    from ctfgen.data.datasets import FMNIST_CLASSES

    args = ["--classifier", str(tiny_classifier), "--data-dir", str(fake_fmnist)]
    own = run_eval(capsys, "--samples", str(fake_samples), *args)
    with np.load(fake_samples) as f:
        images, labels = f["arr_0"], f["labels"]
    folder_names = sorted(name.replace("/", "_") for name in FMNIST_CLASSES)  # "T-shirt_top", as a folder has it
    folder_ids = np.array([folder_names.index(name.replace("/", "_")) for name in FMNIST_CLASSES])[labels]
    named = write_npz(tmp_path / "named.npz", arr_0=images, labels=folder_ids, class_names=np.array(folder_names))
    matched = run_eval(capsys, "--samples", str(named), *args)
    assert matched["accuracy"] == pytest.approx(own["accuracy"]) and matched["per_class"] == own["per_class"]
    unnumbered = write_npz(tmp_path / "unnumbered.npz", arr_0=images, labels=folder_ids)  # ids taken as they are
    assert run_eval(capsys, "--samples", str(unnumbered), *args)["per_class"] != own["per_class"]
    shapes = write_npz(tmp_path / "shapes.npz", arr_0=images, labels=labels,
                       class_names=np.array([f"shape {c}" for c in range(10)]))
    other = run_eval(capsys, "--samples", str(shapes), *args)
    assert "accuracy" not in other and "per_class" not in other and other["fid"] == pytest.approx(own["fid"])
    assert any("not the fmnist classifier's" in note for note in other["notes"])


def test_per_class_breakdown_with_labels(tiny_classifier, fake_fmnist, fake_samples, cache, tmp_path, capsys):
    args = ["--classifier", str(tiny_classifier), "--data-dir", str(fake_fmnist)]
    result = run_eval(capsys, "--samples", str(fake_samples), *args)
    rows = result["per_class"]
    assert [row["class"] for row in rows] == list(range(10))
    assert rows[1]["name"] == "Trouser"
    labels = np.load(fake_samples)["labels"]
    assert [row["n"] for row in rows] == [int((labels == c).sum()) for c in range(10)]
    assert all(0 <= row["accuracy"] <= 1 and "fid" in row and row["n_ref"] >= 6 for row in rows)
    assert any(row["fid"] is not None for row in rows)
    weighted = sum(row["accuracy"] * row["n"] for row in rows) / sum(row["n"] for row in rows)
    assert result["accuracy"] == pytest.approx(weighted)
    # without labels: the same figures, no breakdown
    unlabelled = write_npz(tmp_path / "unlabelled.npz", arr_0=np.load(fake_samples)["arr_0"])
    plain = run_eval(capsys, "--samples", str(unlabelled), *args)
    assert "per_class" not in plain and "accuracy" not in plain
    assert plain["fid"] == pytest.approx(result["fid"])


def test_sample_file_as_reference(tiny_classifier, fake_fmnist, fake_samples, cache, capsys):
    result = run_eval(capsys, "--samples", str(fake_samples), "--ref", str(fake_samples),
                      "--classifier", str(tiny_classifier))
    assert result["fid"] == pytest.approx(0, abs=1e-6)
    assert result["precision"] == 1 and result["recall"] == 1


def test_floor_scores_training_images(tiny_classifier, fake_fmnist, cache, capsys):
    result = run_eval(capsys, "--floor", "--floor-n", "100", "--classifier", str(tiny_classifier),
                      "--data-dir", str(fake_fmnist))
    assert result["floor"] is True and result["n_samples"] == 100 and result["ref"] == "fmnist-test"
    assert result["fid"] >= 0 and len(result["per_class"]) == 10


def test_reconstruction_scores_the_tokenizers_reconstructions(tiny_classifier, fake_fmnist, cache, tmp_path, capsys):
    from ctfgen.tokenizer.model import VQ_PRESETS, VQModel

    torch.manual_seed(0)
    VQModel(VQ_PRESETS["VQ-tiny"]).save_pretrained(tmp_path / "vq")  # untrained: poor reconstructions
    args = ["--floor-n", "100", "--classifier", str(tiny_classifier), "--data-dir", str(fake_fmnist)]
    floor = run_eval(capsys, "--floor", *args)
    recon = run_eval(capsys, "--reconstruction", str(tmp_path / "vq"), *args)
    assert recon["reconstruction"] is True and recon["n_samples"] == 100
    assert recon["fid"] > 10 * floor["fid"]  # the real images themselves are the better floor (here ~1000x)
    assert main(["eval", "--floor", "--reconstruction", str(tmp_path / "vq")]) == 2
    assert "--floor and --reconstruction" in error_line(capsys)


def test_human_readable_output(tiny_classifier, fake_fmnist, fake_samples, cache, capsys):
    assert main(["eval", "--samples", str(fake_samples), "--classifier", str(tiny_classifier),
                 "--data-dir", str(fake_fmnist)]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "precision" in out and "class 9 Ankle boot" in out


class TinyNetwork(FeatureNetwork):
    """A stand-in feature network: 4-d pooled features, 3-d spatial, accepting 4/3-d ADM statistics."""

    name, fingerprint, source, precomputed_dims = "tiny", "tiny-v1", "test", (4, 3)

    def forward(self, images):
        x = images.float().flatten(1)
        return {"pool": x[:, :4], "logits": x[:, :5], "spatial": x[:, 4:7]}


def test_adm_reference_batch_statistics_are_used(tmp_path, cache):
    rng = np.random.default_rng(5)
    samples = write_npz(tmp_path / "s.npz", arr_0=rng.integers(0, 255, (40, 4, 4, 3), dtype=np.uint8))
    images = rng.integers(0, 255, (30, 4, 4, 3), dtype=np.uint8)
    mu, sigma, mu_s, sigma_s = np.full(4, 100.0), np.eye(4) * 50, np.full(3, 90.0), np.eye(3) * 40
    ref = write_npz(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    result = evaluate_npz(samples, str(ref), TinyNetwork())
    features = np.load(samples)["arr_0"].reshape(40, -1).astype(np.float64)
    assert result["fid"] == pytest.approx(frechet_distance(*gaussian_stats(features[:, :4]), mu, sigma))
    assert result["sfid"] == pytest.approx(frechet_distance(*gaussian_stats(features[:, 4:7]), mu_s, sigma_s))
    assert result["n_ref"] == 30 and result["precision"] is not None  # precision/recall from its images
    assert "precomputed" in result["notes"][0]
    # statistics only (no arr_0): FID and sFID, no precision/recall
    stats_only = write_npz(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    result = evaluate_npz(samples, str(stats_only), TinyNetwork())
    assert result["fid"] is not None and result["precision"] is None and result["sfid"] is None


def test_eval_command_against_an_adm_reference_batch(tmp_path, cache, monkeypatch, capsys):
    """The last step of the paper-scale recipe (README), `ctfgen eval --features inception --ref
    VIRTUAL_imagenet256_labeled.npz`, on a synthetic file of that layout (arr_0, mu / sigma, mu_s / sigma_s), with
    TinyNetwork standing in for Inception: FID and sFID against the file's statistics, precision/recall against its
    images, IS from the samples alone."""
    import ctfgen.evaluation

    monkeypatch.setattr(ctfgen.evaluation, "load_feature_network",
                        lambda name, **kwargs: TinyNetwork() if name == "inception" else pytest.fail(name))
    rng = np.random.default_rng(7)
    images = rng.integers(0, 255, (50, 4, 4, 3), dtype=np.uint8)
    samples = write_npz(tmp_path / "samples.npz", arr_0=images, labels=np.repeat(np.arange(10, dtype=np.int64), 5))
    mu, sigma, mu_s, sigma_s = np.full(4, 100.0), np.eye(4) * 50, np.full(3, 90.0), np.eye(3) * 40
    ref = write_npz(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=rng.integers(0, 255, (30, 4, 4, 3), np.uint8),
                    mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    result = run_eval(capsys, "--samples", str(samples), "--ref", str(ref), "--features", "inception")
    features = images.reshape(50, -1).astype(np.float64)
    assert result["features"] == "tiny" and result["n_samples"] == 50 and result["n_ref"] == 30
    assert result["fid"] == pytest.approx(frechet_distance(*gaussian_stats(features[:, :4]), mu, sigma))
    assert result["sfid"] == pytest.approx(frechet_distance(*gaussian_stats(features[:, 4:7]), mu_s, sigma_s))
    assert result["precision"] is not None and result["inception_score"] > 0 and "precomputed" in result["notes"][0]


def test_stats_only_reference_for_other_features_is_refused(tiny_classifier, fake_samples, tmp_path, capsys):
    ref = write_npz(tmp_path / "adm.npz", mu=np.zeros(16), sigma=np.eye(16))
    assert main(["eval", "--samples", str(fake_samples), "--ref", str(ref), "--classifier", str(tiny_classifier)]) == 2
    assert "no images" in error_line(capsys)


# --- Inception ------------------------------------------------------------------------------------


def test_inception_without_weights_is_one_line(fake_samples, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CTFGEN_INCEPTION_WEIGHTS", raising=False)
    assert main(["eval", "--samples", str(fake_samples), "--features", "inception"]) == 2
    line = error_line(capsys)
    assert "--inception-weights" in line and "CTFGEN_INCEPTION_WEIGHTS" in line
    monkeypatch.setenv("CTFGEN_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    assert main(["eval", "--samples", str(fake_samples), "--features", "inception"]) == 2
    assert "missing.pth not found" in error_line(capsys)


def require_torch_fidelity():
    require([] if importlib.util.find_spec("torch_fidelity") else
            ["torch-fidelity (pip install --no-deps torch-fidelity)"], "the Inception tests")


def test_inception_weights_that_are_not_a_state_dict(fake_samples, tmp_path, capsys):
    require_torch_fidelity()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    assert main(["eval", "--samples", str(fake_samples), "--features", "inception", "--inception-weights",
                 str(bad)]) == 2
    assert "not a PyTorch state dict" in error_line(capsys)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with seeded random weights, saved as the real weights file is (torch.save of
    its state dict): nothing is downloaded. Every tensor is drawn: Kaiming-normal convolutions keep the activations'
    scale through the network and the batch norms get random statistics and affine parameters. The pooled features
    of any two images share a large mean; the classifier's rows are made orthogonal to it (measured on a few
    images) and scaled to what differs between images, so that the class probabilities differ between images (an
    Inception Score well above 1) instead of all favouring the same classes."""
    require_torch_fidelity()
    from ctfgen.evaluation.features import inception_extractor_class

    class Unloaded(inception_extractor_class()):
        def load_state_dict(self, *args, **kwargs):  # its constructor loads a weights file: the weights come below
            return None

    directory = tmp_path_factory.mktemp("inception")
    torch.save({}, directory / "empty.pth")
    model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(directory / "empty.pth"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        (pool,) = model(torch.from_numpy(blocks(4, seed=9, patch=6)).permute(0, 3, 1, 2).contiguous())
        mean = torch.nn.functional.normalize(pool.mean(0), dim=0)
        spread = (pool - pool.mean(0)).norm(dim=1).mean()
        weight = torch.randn(model.fc.weight.shape, generator=generator)
        model.fc.weight.copy_((weight - (weight @ mean)[:, None] * mean) * 3 / spread)
        model.fc.bias.normal_(0, 1.0, generator=generator)
    path = directory / "weights.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def torch_fidelity():
    """torch-fidelity's package, the reference for the Inception figures. Its __init__ imports torchvision (for data
    sets and other feature extractors) although its Inception-v3 and metric functions do not use it, and ctfgen
    installs it without torchvision (pyproject.toml, the inception extra): where torchvision is missing, empty
    stand-ins answer those imports while the package is imported, and are removed again."""
    require_torch_fidelity()
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchvision") is None:
            stand_ins = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.datasets",
                                                                   "torchvision.transforms",
                                                                   "torchvision.transforms.functional")}
            datasets = stand_ins["torchvision.datasets"]
            datasets.CIFAR10 = datasets.CIFAR100 = datasets.STL10 = type("Unavailable", (), {})
            for name, module in stand_ins.items():
                mp.setitem(sys.modules, name, module)
        for name in [name for name in sys.modules if name == "torch_fidelity" or name.startswith("torch_fidelity.")]:
            mp.delitem(sys.modules, name)  # ctfgen may have imported its Inception module without the package
        return importlib.import_module("torch_fidelity")


class TorchFidelityInception:
    """torch-fidelity's own Inception-v3, loaded from the weights file as torch-fidelity loads it, with ADM's spatial
    features (sFID: the first 7 channels of `mixed_6/conv`, Mixed_6d's 1x1 branch, in (h, w, c) order) hooked out."""

    def __init__(self, torch_fidelity, weights):
        self.network = torch_fidelity.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
        self.network.Mixed_6d.branch1x1.register_forward_hook(self.keep_spatial)

    def keep_spatial(self, module, inputs, output):
        self.spatial = output[:, :7].permute(0, 2, 3, 1).reshape(len(output), 17 * 17 * 7)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [N, H, W, 3] -> pool [N, 2048], logits_unbiased [N, 1008], spatial [N, 2023] (float32)."""
        pool, logits = self.network(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        return pool, logits, self.spatial


def blocks(n: int, seed: int, patch: int) -> np.ndarray:
    """n tiny uint8 images [n, 16, 16, 3]: a random colour, a square of another of side `patch`, noise."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 16, 16, 3), np.uint8)
    for i in range(n):
        image = np.broadcast_to(rng.integers(0, 256, 3), (16, 16, 3)).copy()
        y, x = rng.integers(0, 16 - patch, 2)
        image[y:y + patch, x:x + patch] = rng.integers(0, 256, 3)
        images[i] = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255)
    return images


def test_inception_features_shapes(random_inception_weights, torch_fidelity):
    from ctfgen.evaluation.features import InceptionFeatures, extract_features

    network = InceptionFeatures(random_inception_weights)
    images = blocks(3, seed=6, patch=5)
    features = extract_features(network, images, batch_size=2)
    assert features.pool.shape == (3, 2048) and features.spatial.shape == (3, 7 * 17 * 17)
    assert features.probs.shape == (3, 1008) and np.allclose(features.probs.sum(1), 1, atol=1e-5)
    assert network.fingerprint.startswith("inception-")
    pool, logits, spatial = TorchFidelityInception(torch_fidelity, random_inception_weights)(images)
    np.testing.assert_allclose(features.pool, pool, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(features.spatial, spatial, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features.probs, torch.softmax(logits.double(), 1), rtol=1e-4, atol=1e-7)


@pytest.mark.slow  # about a minute of CPU, most of it the matrix square roots of FID and sFID (2048 and 2023 wide)
def test_eval_with_inception_matches_torch_fidelity(random_inception_weights, torch_fidelity, cache, tmp_path,
                                                    capsys):
    """`ctfgen eval --features inception --ref` an ADM reference batch (its images, and statistics made elsewhere)
    end to end, against the figures torch-fidelity computes with its own functions from its own Inception-v3 loaded
    from the same weights file: FID and sFID (statistics in float64) against the batch's statistics, the Inception
    Score (one part: torch-fidelity shuffles before splitting in its own way), precision/recall (k = 3) against the
    batch's images."""
    fid = torch_fidelity.metric_fid
    samples_images, ref_images = blocks(16, seed=1, patch=3), blocks(16, seed=2, patch=3)
    reference = TorchFidelityInception(torch_fidelity, random_inception_weights)
    pool, logits, spatial = reference(samples_images)
    ref_pool, _, ref_spatial = reference(ref_images)

    def stats(features):
        return fid.fid_features_to_statistics(features.double())

    def frechet(a, b):
        return fid.fid_statistics_to_metric(a, b, verbose=False)[torch_fidelity.KEY_METRIC_FID]

    # The batch's statistics: torch-fidelity's, of half of its images, so that using them is told apart from
    # recomputing them from the images.
    adm_stats, adm_spatial = stats(ref_pool[:8]), stats(ref_spatial[:8])
    ref = write_npz(tmp_path / "VIRTUAL_batch.npz", arr_0=ref_images, mu=adm_stats["mu"], sigma=adm_stats["sigma"],
                    mu_s=adm_spatial["mu"], sigma_s=adm_spatial["sigma"])
    samples = write_npz(tmp_path / "samples.npz", arr_0=samples_images, labels=np.arange(16) % 4)
    result = run_eval(capsys, "--samples", str(samples), "--ref", str(ref), "--features", "inception",
                      "--inception-weights", str(random_inception_weights), "--is-splits", "1")
    assert result["features"] == "inception" and (result["n_samples"], result["n_ref"]) == (16, 16)
    assert "precomputed" in result["notes"][0] and [row["n"] for row in result["per_class"]] == [4] * 4

    assert result["fid"] == pytest.approx(frechet(stats(pool), adm_stats), rel=1e-4)
    assert result["sfid"] == pytest.approx(frechet(stats(spatial), adm_spatial), rel=1e-4)
    inception_score = torch_fidelity.metric_isc.isc_features_to_metric(logits, splits=1, shuffle=False)[
        torch_fidelity.KEY_METRIC_ISC_MEAN]
    assert result["inception_score"] == pytest.approx(inception_score, rel=1e-5) and inception_score > 1.5
    precision, recall = torch_fidelity.metric_prc.calculate_precision_recall_full(pool, ref_pool, neighborhood=3)
    assert result["precision"] == pytest.approx(precision, abs=1.01 / 16)  # a point on a ball's edge may differ
    assert result["recall"] == pytest.approx(recall, abs=1.01 / 16)
    assert min(precision, recall) < 1  # the random network tells these images apart


# --- training the classifier; the shipped one ---------------------------------------------------------


def test_train_classifier_command(fake_fmnist, tmp_path, capsys):
    out = tmp_path / "classifier"
    assert main(["eval", "train-classifier", "--out", str(out), "--data-dir", str(fake_fmnist), "--epochs", "1",
                 "--batch-size", "64", "--warmup-steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "fmnist-classifier" and config["command"].startswith("ctfgen eval train-classifier")
    assert config["test_accuracy"] == result["test_accuracy"] and config["train"]["epochs"] == 1
    assert (out / "metrics.jsonl").is_file()
    model = FMNISTClassifier.from_pretrained(out)
    assert model.forward_features(torch.zeros(2, 3, 32, 32))["pool"].shape == (2, 128)


SHIPPED = pretrained_dir() / "fmnist" / "classifier"
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no shipped classifier")
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="Fashion-MNIST is not installed: run scripts/setup.sh "
                    "(apt-get install dataset-fashion-mnist)")
def test_shipped_classifier_reaches_91_percent():
    from ctfgen.data.datasets import FashionMNIST
    from ctfgen.evaluation.classifier import classifier_accuracy

    test = FashionMNIST("test")
    accuracy = classifier_accuracy(FMNISTClassifier.from_pretrained(SHIPPED), test.images, test.labels)
    assert accuracy >= 0.91
    assert json.loads((SHIPPED / "config.json").read_text())["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
