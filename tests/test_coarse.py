import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from ctfgen import cli
from ctfgen.clustering import CoarseMap, cluster_codebook, codebook_fingerprint, kmeans
from ctfgen.data.codes import CodeDataset, extract_codes
from ctfgen.data.datasets import FashionMNIST
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.redundancy import swap_within_clusters
from ctfgen.tokenizer.model import VQ_PRESETS, VQModel

BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "pretrained/fmnist/tokenizer"


def sklearn_inertia(codebook: torch.Tensor, k: int) -> float:
    x = F.normalize(codebook.double(), dim=-1).numpy()
    return KMeans(n_clusters=k, n_init=4, random_state=0).fit(x).inertia_


@pytest.mark.parametrize("source,k", [pytest.param("random-16384x8", 512, marks=pytest.mark.slow), ("bundled", 128)])
def test_kmeans_inertia_within_1_percent_of_sklearn(source, k):
    if source == "bundled":
        codebook = VQModel.from_pretrained(BUNDLED_TOKENIZER).codebook_weights
    else:
        codebook = torch.randn(16384, 8, generator=torch.Generator().manual_seed(0))
    coarse_map = cluster_codebook(codebook, k, seed=0)
    inertia = inertia_by_hand(codebook, coarse_map.coarse_of_fine, k)
    assert coarse_map.inertia == pytest.approx(inertia, rel=1e-9)  # the inertia the map reports is its own
    assert inertia <= 1.01 * sklearn_inertia(codebook, k)
    assert coarse_map.cluster_sizes().min() >= 1 and coarse_map.k == k


def inertia_by_hand(codebook: torch.Tensor, assignment: torch.Tensor, k: int, centroids=None) -> float:
    """Sum of squared distances of the L2-normalised codewords to their cluster's centroid (by default its
    members' mean), in numpy float64, cluster by cluster."""
    x = F.normalize(codebook.double(), dim=-1).numpy()
    total = 0.0
    for c in range(k):
        members = x[assignment.numpy() == c]
        centre = members.mean(0) if centroids is None else centroids[c].double().numpy()
        total += float(((members - centre) ** 2).sum())
    return total


def test_kmeans_returns_the_inertia_of_its_assignment_and_centroids():
    """kmeans' own (labels, centroids, inertia): the centroids are their members' means, the inertia theirs, and
    no codeword is nearer another centroid (Lloyd's fixed point)."""
    codebook = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    x = F.normalize(codebook.double(), dim=-1)
    labels, centroids, inertia = kmeans(x, 16, n_init=2, seed=0)
    for c in range(16):
        np.testing.assert_allclose(centroids[c].numpy(), x[labels == c].mean(0).numpy(), rtol=0, atol=1e-12)
    assert inertia == pytest.approx(inertia_by_hand(codebook, labels, 16, centroids), rel=1e-9)
    distances = ((x[:, None] - centroids[None]) ** 2).sum(-1)
    assert torch.equal(distances.argmin(1), labels)


def test_kmeans_is_deterministic_and_random_is_balanced():
    codebook = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1))
    a, b = cluster_codebook(codebook, 32, seed=3), cluster_codebook(codebook, 32, seed=3)
    assert torch.equal(a.coarse_of_fine, b.coarse_of_fine) and a.inertia == b.inertia
    random = cluster_codebook(codebook, 32, method="random", seed=3)
    sizes = random.cluster_sizes()
    assert int(sizes.max() - sizes.min()) <= 1 and int(sizes.sum()) == 1000
    assert random.inertia > 1.5 * a.inertia  # clustering by similarity makes much tighter groups


def test_map_roundtrip_and_refusal_for_another_codebook(tmp_path):
    codebook = torch.randn(256, 8)
    coarse_map = cluster_codebook(codebook, 16, seed=0)
    coarse_map.save(tmp_path / "map.safetensors")
    loaded = CoarseMap.load(tmp_path / "map.safetensors")
    assert torch.equal(loaded.coarse_of_fine, coarse_map.coarse_of_fine)
    assert (loaded.k, loaded.method, loaded.fingerprint) == (16, "kmeans", codebook_fingerprint(codebook))
    # an fp16 export of the same tokenizer has the same codebook
    loaded.check_fingerprint(codebook_fingerprint(codebook.half().float()), 256)
    with pytest.raises(CtfgenError, match="another codebook"):
        loaded.check_fingerprint(codebook_fingerprint(torch.randn(256, 8)), 256)


def test_swaps_stay_in_cluster_and_move_every_token_that_can_move():
    coarse_map = cluster_codebook(torch.randn(512, 8), 40, seed=0)
    codes = torch.randint(512, (64, 8, 8))
    swapped = swap_within_clusters(codes, coarse_map, torch.Generator().manual_seed(0))
    coarse = coarse_map.coarse_of_fine
    assert torch.equal(coarse[swapped], coarse[codes])
    movable = coarse_map.cluster_sizes()[coarse[codes]] > 1
    assert torch.all(swapped[movable] != codes[movable])
    assert torch.equal(swapped[~movable], codes[~movable])


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    VQModel(VQ_PRESETS["VQ-tiny"]).save_pretrained(directory)
    return directory


def test_extracted_codes_decode_to_the_tokenizers_reconstructions(tmp_path, fake_fmnist, tiny_tokenizer):
    tokenizer = VQModel.from_pretrained(tiny_tokenizer)
    dataset = FashionMNIST("test", data_dir=fake_fmnist)
    manifest = extract_codes(tokenizer, dataset, tmp_path / "codes", flip=True, batch_size=24, progress=False)
    assert manifest["count"] == 64 and manifest["views"] == 2
    codes = CodeDataset(tmp_path / "codes")
    assert codes.codes[0].dtype == np.uint16
    grids = codes.grids(range(len(codes)))  # [64, 2, 8, 8]
    images = dataset.images(torch.arange(64))
    assert torch.equal(grids[:, 0], tokenizer.encode(images))
    assert torch.equal(grids[:, 1], tokenizer.encode(images.flip(-1)))
    assert torch.equal(tokenizer.decode(grids[:, 0]), tokenizer.decode(tokenizer.encode(images)))
    assert torch.equal(codes.labels, dataset.labels)


def test_interrupted_extraction_leaves_no_finished_output(tmp_path, fake_fmnist, tiny_tokenizer, monkeypatch):
    tokenizer = VQModel.from_pretrained(tiny_tokenizer)
    dataset = FashionMNIST("test", data_dir=fake_fmnist)
    calls = {"n": 0}
    encode = tokenizer.encode

    def failing_encode(images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return encode(images)

    monkeypatch.setattr(tokenizer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        extract_codes(tokenizer, dataset, tmp_path / "codes", batch_size=16, progress=False)
    assert not (tmp_path / "codes").exists() and not (tmp_path / "codes.partial").exists()
    with pytest.raises(CtfgenError, match="no extracted codes"):
        CodeDataset(tmp_path / "codes")
    monkeypatch.setattr(tokenizer, "encode", encode)
    assert extract_codes(tokenizer, dataset, tmp_path / "codes", batch_size=16, progress=False)["count"] == 64
    assert not Path(str(tmp_path / "codes") + ".partial").exists()


@pytest.fixture(scope="module")
def tiny_map(tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "map.safetensors"
    cluster_codebook(VQModel.from_pretrained(tiny_tokenizer).codebook_weights, 8, seed=0).save(path)
    return path


def test_cluster_command(tmp_path, tiny_tokenizer, capsys):
    assert cli.main(["cluster", "--tokenizer", str(tiny_tokenizer), "--k", "8", "--out",
                     str(tmp_path / "map.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["k"] == 8 and result["cluster_sizes"]["min"] >= 1
    assert CoarseMap.load(tmp_path / "map.safetensors").k == 8


def test_redundancy_command(tmp_path, fake_fmnist, tiny_tokenizer, tiny_map, capsys):
    assert cli.main(["redundancy", "--tokenizer", str(tiny_tokenizer), "--map", str(tiny_map),
                     "--data-dir", str(fake_fmnist), "--n", "16", "--out", str(tmp_path / "red"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert {"kmeans_psnr", "random_psnr", "kmeans_ssim", "random_ssim"} <= figures.keys()
    assert (tmp_path / "red/redundancy.png").is_file()


def test_a_map_of_another_codebook_is_refused_in_one_line(tmp_path, fake_fmnist, tiny_map):
    other = tmp_path / "other"
    VQModel(VQ_PRESETS["VQ-tiny"]).save_pretrained(other)  # a different random codebook
    run = subprocess.run([sys.executable, "-m", "ctfgen.cli", "redundancy", "--tokenizer", str(other), "--map",
                          str(tiny_map), "--data-dir", str(fake_fmnist), "--n", "4",
                          "--out", str(tmp_path / "red2")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "another codebook" in run.stderr and "Traceback" not in run.stderr
