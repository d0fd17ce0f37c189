"""Token grids on disk: extracted once with the tokenizer, memory-mapped by the training loaders.

Layout of an extraction directory:
    manifest.json            tokenizer fingerprint, grid size, views, count, shards
    codes.<rank>.npy         uint16 (V <= 65536) or int32 [n, views, h, w]
    labels.<rank>.npy        int64 [n]
Views are the image itself, its mirror with --flip, and ten crops (x2 with --flip) with --ten-crop.
Everything is written under `<out>.partial/` and renamed when complete, so an interrupted run
leaves no output that looks finished; a re-run starts that directory afresh.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .checkpoint import replace_dir
from .clustering import CoarseMap
from .data import FashionMNIST, ImageFolder, center_crop, to_model_range
from .distributed import Runtime, barrier
from .errors import CtfgenError
from .tokenizer.model import VQModel

MANIFEST = "manifest.json"


class ViewDataset(Dataset):
    """Wraps an image dataset so that each item is all of its views: [n_views, 3, H, W]."""

    def __init__(self, dataset, flip: bool, ten_crop: bool = False, crop_range: float = 1.1):
        if ten_crop and not isinstance(dataset, ImageFolder):
            raise CtfgenError("--ten-crop applies to image folders only")
        self.dataset, self.flip, self.ten_crop, self.crop_range = dataset, flip, ten_crop, crop_range

    @property
    def n_views(self) -> int:
        return (10 if self.ten_crop else 1) * (2 if self.flip else 1)

    def __len__(self):
        return len(self.dataset)

    def _ten_crops(self, i: int) -> torch.Tensor:
        path, _ = self.dataset.files[i]
        size = self.dataset.image_size
        with Image.open(path) as f:
            big = center_crop(f.convert("RGB"), int(size * self.crop_range))
        arr = torch.from_numpy(np.asarray(big, dtype=np.uint8).copy()).permute(2, 0, 1)
        m = arr.shape[-1] - size
        corners = [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]
        crops = [arr[:, y:y + size, x:x + size] for y, x in corners]
        crops += [c.flip(-1) for c in crops]  # torchvision's TenCrop: five crops and their mirrors
        return to_model_range(torch.stack(crops))

    def __getitem__(self, i: int):
        if self.ten_crop:
            views, label = self._ten_crops(i), self.dataset.files[i][1]
        else:
            image, label = self.dataset[i]
            views = image[None]
        if self.flip:
            views = torch.cat([views, views.flip(-1)])
        return views, label


def extract_codes(tokenizer: VQModel, dataset, out, *, flip: bool = False, ten_crop: bool = False,
                  batch_size: int = 256, num_workers: int = 0, runtime: Runtime = Runtime(),
                  extra_manifest: dict | None = None, progress: bool = True) -> dict:
    """Encode every image (and its views) of `dataset` and write the grids under `out`."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(runtime)
    if isinstance(dataset, FashionMNIST) and dataset.flip:
        raise CtfgenError("extract from the un-augmented dataset; --flip adds the mirrored views")
    views = ViewDataset(dataset, flip=flip, ten_crop=ten_crop)
    shard = Subset(views, range(runtime.rank, len(views), runtime.world_size))
    device = next(tokenizer.parameters()).device
    cfg = tokenizer.config
    dtype = np.uint16 if cfg.codebook_size <= 65536 else np.int32
    sample, _ = views[0]
    h, w = sample.shape[-2] // cfg.downsample, sample.shape[-1] // cfg.downsample
    codes = np.lib.format.open_memmap(partial / f"codes.{runtime.rank}.npy", mode="w+", dtype=dtype,
                                      shape=(len(shard), views.n_views, h, w))
    labels = np.zeros(len(shard), dtype=np.int64)
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda items: (torch.stack([v for v, _ in items]),
                                                  torch.tensor([label for _, label in items])))
    pos = 0
    with torch.no_grad():
        for batch, batch_labels in tqdm(loader, desc=f"extract[{runtime.rank}]", unit="batch",
                                        disable=not (progress and runtime.is_main), dynamic_ncols=True):
            n = len(batch)
            grid = tokenizer.encode(batch.flatten(0, 1).to(device)).view(n, views.n_views, h, w)
            codes[pos:pos + n] = grid.cpu().numpy().astype(dtype)
            labels[pos:pos + n] = batch_labels.numpy()
            pos += n
    codes.flush()
    del codes
    np.save(partial / f"labels.{runtime.rank}.npy", labels)
    barrier(runtime)
    manifest = {
        "format": "ctfgen-codes-v1", "tokenizer_fingerprint": tokenizer.fingerprint,
        "codebook_size": cfg.codebook_size, "grid": [h, w], "image_size": list(sample.shape[-2:]),
        "views": views.n_views, "flip": flip, "ten_crop": ten_crop, "count": len(views),
        "shards": [{"codes": f"codes.{r}.npy", "labels": f"labels.{r}.npy",
                    "count": len(range(r, len(views), runtime.world_size))} for r in range(runtime.world_size)],
        **(extra_manifest or {}),
    }
    if runtime.is_main:
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(partial, out)
    barrier(runtime)
    return manifest


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        hint = " (an extraction was interrupted: run it again)" if Path(str(directory) + ".partial").exists() else ""
        raise CtfgenError(f"{directory} holds no extracted codes (no {MANIFEST}){hint}; run `ctfgen extract`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "ctfgen-codes-v1":
        raise CtfgenError(f"{path} is not a ctfgen codes manifest")
    return manifest


class CodeDataset(Dataset):
    """Memory-mapped token grids: item i -> (codes LongTensor [views, h, w], label).

    A coarse map given here must come from the tokenizer that made the codes.
    """

    def __init__(self, directory, coarse_map: CoarseMap | None = None):
        directory = Path(directory)
        self.manifest = read_manifest(directory)
        self.codes = [np.load(directory / s["codes"], mmap_mode="r") for s in self.manifest["shards"]]
        self.labels = torch.from_numpy(np.concatenate([np.load(directory / s["labels"])
                                                       for s in self.manifest["shards"]]))
        self.offsets = np.cumsum([0] + [len(c) for c in self.codes])
        if coarse_map is not None and coarse_map.fingerprint != self.manifest["tokenizer_fingerprint"]:
            raise CtfgenError(f"the coarse map was made for another tokenizer than the codes in {directory} "
                              f"(map {coarse_map.fingerprint}, codes {self.manifest['tokenizer_fingerprint']})")
        self.coarse_map = coarse_map

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def grids(self, index) -> torch.Tensor:
        """Fine grids [len(index), views, h, w] for a sorted or unsorted list of indices."""
        index = np.asarray(index, dtype=np.int64)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((len(index), *self.codes[0].shape[1:]), dtype=np.int64)
        for s in np.unique(shard):  # one gather per shard, not per item
            rows = shard == s
            out[rows] = self.codes[s][index[rows] - self.offsets[s]]
        return torch.from_numpy(out)

    def __getitem__(self, i: int):
        return self.grids([i])[0], int(self.labels[i])
