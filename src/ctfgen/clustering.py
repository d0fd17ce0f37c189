"""Coarse labels: a map from each of the V fine tokens to one of K clusters of its codewords.

k-means runs on the L2-normalised codewords (the tokenizer looks codes up on the unit sphere,
where squared distance is 2 - 2 cos). A random balanced partition is the paper's control. Every
map carries the fingerprint of the codebook it was made from, and refuses any other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ctfgen.choices import CLUSTER_METHODS
from ctfgen.errors import CtfgenError
from ctfgen.files import save_tensors, write_atomic
from ctfgen.tokenizer.model import codebook_fingerprint
from ctfgen.validation import MAX_VOCAB

FORMAT = "ctfgen-coarse-map-v1"
INTEGER_DTYPES = ("U8", "I8", "U16", "I16", "U32", "I32", "I64")  # safetensors' names


def _sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.t() + centroids.pow(2).sum(1)).clamp_min_(0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per centre, the best kept), as scikit-learn."""
    n = len(x)
    trials = 2 + int(math.log(k))
    centres = [x[torch.randint(n, (1,), generator=generator)]]
    closest = _sq_distances(x, centres[0]).squeeze(1)
    for _ in range(1, k):
        cumulative = torch.cumsum(closest, 0)
        picks = torch.searchsorted(cumulative, torch.rand(trials, generator=generator, dtype=x.dtype) * cumulative[-1])
        candidates = x[picks.clamp_max(n - 1)]
        new_closest = torch.minimum(closest[None], _sq_distances(x, candidates).t())  # [trials, n]
        best = int(new_closest.sum(1).argmin())
        centres.append(candidates[best:best + 1])
        closest = new_closest[best]
    return torch.cat(centres)


def lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int = 300, tol: float = 1e-6):
    """Lloyd iterations; an emptied cluster takes the point farthest from its centre.

    Returns the labels that define the final centroids, so no cluster is ever empty.
    """
    k = len(centroids)
    previous = math.inf
    for _ in range(max_iter):
        nearest, labels = _sq_distances(x, centroids).min(1)
        counts = torch.bincount(labels, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(nearest.argmax())
            counts[labels[far]] -= 1
            labels[far], nearest[far], counts[empty] = empty, 0.0, 1
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts[:, None].to(x.dtype)
        inertia = float((x - centroids[labels]).pow(2).sum())
        if previous - inertia <= tol * inertia:
            break
        previous = inertia
    return labels, centroids, inertia


def kmeans(x: torch.Tensor, k: int, *, n_init: int = 4, seed: int = 0, max_iter: int = 300):
    """Best of `n_init` k-means++ / Lloyd runs. Returns (labels [N], centroids [K, D], inertia)."""
    x = x.double()  # sums over 16k points: double keeps the inertia comparable to scikit-learn's
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        labels, centroids, inertia = lloyd(x, kmeans_plus_plus(x, k, generator), max_iter=max_iter)
        if best is None or inertia < best[2]:
            best = (labels, centroids, inertia)
    return best


def random_partition(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Balanced random labels: sizes differ by at most one."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % k)[torch.randperm(n, generator=generator)]


@dataclass
class CoarseMap:
    coarse_of_fine: torch.Tensor  # [V] long, values in [0, K)
    k: int
    method: str
    seed: int
    inertia: float  # sum of squared distances of normalised codewords to their cluster mean
    fingerprint: str  # of the codebook the map was made from

    def __post_init__(self):
        """Every fine token in one of K non-empty clusters: a map breaking this would index out of range or
        leave stage 2 a cluster with no member to pick."""
        c = self.coarse_of_fine
        if not isinstance(c, torch.Tensor) or c.dtype != torch.long or c.dim() != 1 or len(c) == 0:
            raise CtfgenError("coarse_of_fine must be a non-empty 1-D LongTensor of cluster ids")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= len(c):
            raise CtfgenError(f"k {self.k!r} must be a whole number of clusters between 1 and the {len(c)} codes")
        if int(c.min()) < 0 or int(c.max()) >= self.k:
            raise CtfgenError(f"cluster ids must lie in [0, k = {self.k}), found {int(c.min())}..{int(c.max())}")
        empty = int((self.cluster_sizes() == 0).sum())
        if empty:
            raise CtfgenError(f"clusters without a member: {empty} of the {self.k}")
        if self.method not in CLUSTER_METHODS:
            raise CtfgenError(f"unknown clustering method {self.method!r}; the map must be one of "
                              f"{', '.join(CLUSTER_METHODS)}")

    @property
    def vocab_size(self) -> int:
        return len(self.coarse_of_fine)

    def cluster_sizes(self) -> torch.Tensor:
        return torch.bincount(self.coarse_of_fine, minlength=self.k)

    def size_stats(self) -> dict:
        sizes = self.cluster_sizes().double()
        return {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
                "std": float(sizes.std())}

    def members(self) -> list[torch.Tensor]:
        """The fine tokens of each cluster."""
        order = torch.argsort(self.coarse_of_fine, stable=True)
        return list(torch.split(order, self.cluster_sizes().tolist()))

    def centroids(self, codebook: torch.Tensor) -> torch.Tensor:
        """The mean normalised codeword of each cluster: [K, D] float64."""
        return cluster_means(codebook, self.coarse_of_fine, self.k)

    def check_fingerprint(self, fingerprint: str, vocab_size: int, where: str = "the tokenizer") -> None:
        if vocab_size != self.vocab_size or fingerprint != self.fingerprint:
            raise CtfgenError(
                f"the coarse map was made for another codebook (map: {self.vocab_size} codes, fingerprint "
                f"{self.fingerprint}; {where}: {vocab_size} codes, fingerprint {fingerprint}); "
                f"make a new map with `ctfgen cluster --tokenizer ...`")

    def save(self, path) -> Path:
        path = Path(path)
        metadata = {"k": str(self.k), "method": self.method, "seed": str(self.seed), "inertia": repr(self.inertia),
                    "fingerprint": self.fingerprint, "vocab_size": str(self.vocab_size),
                    "cluster_sizes": json.dumps(self.size_stats()), "format": FORMAT}
        tensors = {"coarse_of_fine": self.coarse_of_fine.to(torch.int32).contiguous()}
        write_atomic(path, lambda tmp: save_tensors(tensors, tmp, metadata=metadata))
        return path

    @classmethod
    def load(cls, path) -> CoarseMap:
        """A map saved by `save`, checked before it is used: its format tag, metadata and values."""
        path = Path(path)
        if not path.is_file():
            raise CtfgenError(f"coarse map {path} does not exist; make one with `ctfgen cluster`")
        fix = "make a new one with `ctfgen cluster`"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or "coarse_of_fine" not in f.keys():
                    raise CtfgenError(f"{path} is not a ctfgen coarse map (no format tag or no coarse_of_fine); {fix}")
                stored = f.get_slice("coarse_of_fine")
                shape, dtype = stored.get_shape(), stored.get_dtype()
                if len(shape) != 1 or not 1 <= shape[0] <= MAX_VOCAB or dtype not in INTEGER_DTYPES:
                    raise CtfgenError(f"{path}: coarse_of_fine is {dtype} {shape}, not integer cluster ids [V]; {fix}")
                coarse = f.get_tensor("coarse_of_fine").long()
        except (SafetensorError, OSError) as e:
            raise CtfgenError(f"{path} is not a ctfgen coarse map ({e}); {fix}") from None
        try:
            fields = {"k": int(meta["k"]), "method": meta["method"], "seed": int(meta["seed"]),
                      "inertia": float(meta["inertia"]), "fingerprint": meta["fingerprint"]}
            vocab_size = int(meta["vocab_size"])
        except (KeyError, ValueError) as e:
            raise CtfgenError(f"{path}: missing or malformed metadata ({type(e).__name__}: {e}); {fix}") from None
        if vocab_size != len(coarse):
            raise CtfgenError(f"{path}: its metadata says {vocab_size} codes, it maps {len(coarse)}; {fix}")
        try:
            return cls(coarse, **fields)
        except CtfgenError as e:
            raise CtfgenError(f"{path}: {e}; {fix}") from None

    @staticmethod
    def is_coarse_map(path) -> bool:
        """Whether `path` is a coarse map written by ctfgen (its format tag), read from the header alone."""
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("format") == FORMAT
        except (SafetensorError, OSError):
            return False


def cluster_means(codebook: torch.Tensor, coarse_of_fine: torch.Tensor, k: int) -> torch.Tensor:
    """The mean L2-normalised codeword of each of the k clusters, [K, D] on the CPU, in float64: the same on every
    CPU kind (zero for a cluster without members)."""
    x = F.normalize(codebook.detach().cpu().double(), dim=-1)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, coarse_of_fine, x)
    return sums / torch.bincount(coarse_of_fine, minlength=k).clamp_min(1)[:, None]


def inertia_of(codebook: torch.Tensor, coarse_of_fine: torch.Tensor, k: int) -> float:
    x = F.normalize(codebook.detach().cpu().double(), dim=-1)
    return float((x - cluster_means(codebook, coarse_of_fine, k)[coarse_of_fine]).pow(2).sum())


def cluster_codebook(codebook: torch.Tensor, k: int, method: str = "kmeans", seed: int = 0,
                     n_init: int = 4) -> CoarseMap:
    """Group the V codewords into K clusters and return the map with its metadata.

    Pass the tokenizer's stored codebook weights (`VQModel.codebook_weights`): they are
    normalised here, and the map's fingerprint is taken from them."""
    v = len(codebook)
    if method not in CLUSTER_METHODS:
        raise CtfgenError(f"unknown clustering method {method!r}; use one of {', '.join(CLUSTER_METHODS)}")
    if not 1 <= k <= v:
        raise CtfgenError(f"--k must be between 1 and the codebook size {v}, got {k}")
    if n_init < 1:
        raise CtfgenError(f"--n-init must be at least 1, got {n_init}")
    if method == "kmeans":
        labels, _, _ = kmeans(F.normalize(codebook.float(), dim=-1), k, n_init=n_init, seed=seed)
    else:
        labels = random_partition(v, k, seed)
    labels = labels.long()
    return CoarseMap(labels, k, method, seed, inertia_of(codebook, labels, k), codebook_fingerprint(codebook))
