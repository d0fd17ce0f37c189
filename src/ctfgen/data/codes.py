"""Token grids on disk: extracted once with the tokenizer, memory-mapped by the training loaders.

Layout of an extraction directory:
    manifest.json            tokenizer fingerprint, grid size, views, count, shards
    codes.<i>.npy            uint16 (V <= 65536) or int32 [n, views, h, w]
    labels.<i>.npy           int64 [n]
Views are the image itself, its mirror with --flip, and ten crops (x2 with --flip) with --ten-crop.
Extraction writes one shard (i = 0), the same bytes under torchrun as in one process; readers take any number.
Everything is written under `<out>.partial/` and renamed when complete, so an interrupted run
leaves no output that looks finished; an error removes it, and a re-run after a kill starts it afresh.
Reading checks the manifest and every shard (shape, dtype, tokens and labels in range) once, up front.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ctfgen.clustering import CoarseMap
from ctfgen.data.datasets import FashionMNIST, ImageFolder, center_crop, rgb_image, to_model_range
from ctfgen.errors import CtfgenError
from ctfgen.files import replace_dir, reserve_space, writing
from ctfgen.tokenizer.model import VQModel
from ctfgen.training.distributed import Runtime, barrier, gather_in_order, round_robin_batches
from ctfgen.validation import MAX_CLASSES, MAX_TOKENS, MAX_VOCAB, Whole, check_destination, check_output

MANIFEST = "manifest.json"
FORMAT = "ctfgen-codes-v1"
PARTIAL_MARK = ".ctfgen-partial"  # in <out>.partial: a directory this module made, which a re-run may remove
MANIFEST_RULES = {"codebook_size": Whole(1, MAX_VOCAB), "views": Whole(1, 1024), "count": Whole(1)}
SCAN_ROWS = 1 << 16  # range checks read the shards this many items at a time


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
            big = center_crop(rgb_image(f), int(size * self.crop_range))
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


def is_codes_dir(directory) -> bool:
    """Whether `directory` holds codes written by `extract_codes` (a manifest with the format tag)."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fresh_partial(out: Path) -> Path:
    """An empty `<out>.partial/` marked as ours; one left by a killed extraction is removed, anything else refused."""
    partial = out.with_name(out.name + ".partial")
    check_destination(partial, directory=True)
    if partial.exists():
        if not (partial / PARTIAL_MARK).exists():
            raise CtfgenError(f"{partial} exists and was not left by `ctfgen extract`; move it away first")
        shutil.rmtree(partial)
    with writing(out):
        partial.mkdir(parents=True)
        (partial / PARTIAL_MARK).touch()
    return partial


def extract_codes(tokenizer: VQModel, dataset, out, *, flip: bool = False, ten_crop: bool = False,
                  batch_size: int = 256, num_workers: int = 0, runtime: Runtime = Runtime(),
                  extra_manifest: dict | None = None, progress: bool = True) -> dict:
    """Encode every image (and its views) of `dataset` and write the grids under `out`, replacing codes extracted
    there before (never anything else). Nothing is left under `<out>.partial/` when this raises."""
    out = Path(out)
    if batch_size < 1:
        raise CtfgenError(f"--batch-size must be at least 1, got {batch_size}")
    check_output(out, flag="--out", what="extracted codes", is_ours=is_codes_dir, overwrite=True)
    if isinstance(dataset, FashionMNIST) and dataset.flip:
        raise CtfgenError("extract from the un-augmented dataset; --flip adds the mirrored views")
    views = ViewDataset(dataset, flip=flip, ten_crop=ten_crop)
    partial = out.with_name(out.name + ".partial")
    if runtime.is_main:
        _fresh_partial(out)
    barrier(runtime)
    try:
        with writing(out):  # a full disk, a read-only place: one line, and the partial output goes
            manifest = _extract(tokenizer, views, partial, batch_size, num_workers, runtime, progress)
            manifest |= {"flip": flip, "ten_crop": ten_crop, **(extra_manifest or {})}
            if runtime.is_main:
                (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                (partial / PARTIAL_MARK).unlink()
                replace_dir(partial, out, is_codes_dir)
    except BaseException:
        if runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    barrier(runtime)
    return manifest


def _extract(tokenizer: VQModel, views: ViewDataset, partial: Path, batch_size: int, num_workers: int,
             runtime: Runtime, progress: bool) -> dict:
    """Encode this process's batches (whole batches, round robin) and gather them on rank 0, which writes the grids
    and labels of every item under `partial` in item order: one shard, the same bytes whatever the number of
    processes for the same batch size. Returns the manifest (without options)."""
    device = next(tokenizer.parameters()).device
    cfg = tokenizer.config
    dtype = np.uint16 if cfg.codebook_size <= 65536 else np.int32
    sample, _ = views[0]
    h, w = sample.shape[-2] // cfg.downsample, sample.shape[-1] // cfg.downsample
    batches = round_robin_batches(len(views), batch_size, runtime)
    loader = iter(DataLoader(views, batch_sampler=[list(b) for b in batches if b is not None], num_workers=num_workers,
                             collate_fn=lambda items: (torch.stack([v for v, _ in items]),
                                                       torch.tensor([label for _, label in items]))))
    if runtime.is_main:  # rank 0 writes every item; on the others gather_in_order gives nothing to write
        codes = np.lib.format.open_memmap(partial / "codes.0.npy", mode="w+", dtype=dtype,
                                          shape=(len(views), views.n_views, h, w))
        reserve_space(partial / "codes.0.npy")
        labels = np.zeros(len(views), dtype=np.int64)
    pos = 0
    with torch.no_grad():
        # disable=None: no bar when stderr is not a terminal, so that an error stays one line there.
        for batch in tqdm(batches, desc="extract", unit="round", disable=None if progress and runtime.is_main else True,
                          dynamic_ncols=True):
            part = None
            if batch is not None:
                images, batch_labels = next(loader)
                grid = tokenizer.encode(images.flatten(0, 1).to(device)).view(len(images), views.n_views, h, w)
                part = (grid.cpu().numpy().astype(dtype), batch_labels.numpy())
            for grids, part_labels in gather_in_order(part, runtime):
                codes[pos:pos + len(grids)], labels[pos:pos + len(grids)] = grids, part_labels
                pos += len(grids)
    if runtime.is_main:
        codes.flush()
        del codes
        np.save(partial / "labels.0.npy", labels)
    return {
        "format": FORMAT, "tokenizer_fingerprint": tokenizer.fingerprint,
        "codebook_size": cfg.codebook_size, "grid": [h, w], "image_size": list(sample.shape[-2:]),
        "views": views.n_views, "count": len(views),
        "shards": [{"codes": "codes.0.npy", "labels": "labels.0.npy", "count": len(views)}],
    }


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"no {FORMAT!r} format tag"
    for key, rule in MANIFEST_RULES.items():
        if problem := rule.problem(manifest.get(key)):
            return f"{key} {problem}, got {manifest.get(key)!r}"
    grid = manifest.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2 and not any(Whole(1).problem(g) for g in grid)
            and grid[0] * grid[1] <= MAX_TOKENS):
        return f"grid {grid!r} is not [h, w] with h x w at most {MAX_TOKENS} tokens"
    if not isinstance(manifest.get("tokenizer_fingerprint"), str):
        return "no tokenizer fingerprint"
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards or not all(_is_shard(s) for s in shards):
        return "shards must be a list of {codes, labels, count} with file names inside the directory"
    if sum(s["count"] for s in shards) != manifest["count"]:
        return f"the shards hold {sum(s['count'] for s in shards)} items, the manifest says {manifest['count']}"
    return None


def _is_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _is_shard(shard) -> bool:
    return (isinstance(shard, dict) and _is_file_name(shard.get("codes")) and _is_file_name(shard.get("labels"))
            and Whole(0).problem(shard.get("count")) is None)


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        hint = " (an extraction was interrupted: run it again)" if Path(str(directory) + ".partial").exists() else ""
        raise CtfgenError(f"{directory} holds no extracted codes (no {MANIFEST}){hint}; run `ctfgen extract`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CtfgenError(f"{path} is not valid JSON ({e}); extract the codes again") from None
    if problem := _manifest_problem(manifest):
        raise CtfgenError(f"{path} is not a valid ctfgen codes manifest ({problem}); extract the codes again")
    return manifest


def _open_npy(path: Path, shape: tuple, dtypes: tuple) -> np.ndarray:
    """A memory map of the .npy file `path`, refused unless it has this shape and one of these dtypes: its header
    is read first, so a damaged or hostile file costs no allocation."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CtfgenError(f"cannot read {path} ({e}); the codes are damaged: extract them again") from None
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype not in dtypes:
        found = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
        raise CtfgenError(f"{path} holds {found}, the manifest says {' or '.join(map(str, dtypes))} {list(shape)}; "
                          f"extract the codes again")
    return array


def _check_range(array: np.ndarray, high: int, path: Path, what: str) -> None:
    """Refuse values outside [0, high), reading the file a slice at a time."""
    for start in range(0, len(array), SCAN_ROWS):
        part = np.asarray(array[start:start + SCAN_ROWS])
        if part.size and (int(part.min()) < 0 or int(part.max()) >= high):
            raise CtfgenError(f"{path} holds {what} outside [0, {high}) (found {int(part.min())}..{int(part.max())}); "
                              f"the codes are damaged or from another tokenizer: extract them again")


class CodeDataset(Dataset):
    """Memory-mapped token grids: item i -> (codes LongTensor [views, h, w], label).

    A coarse map given here must come from the tokenizer that made the codes.
    """

    def __init__(self, directory, coarse_map: CoarseMap | None = None):
        directory = Path(directory)
        self.manifest = m = read_manifest(directory)
        self.codes, labels = [], []
        for shard in m["shards"]:
            codes = _open_npy(directory / shard["codes"], (shard["count"], m["views"], *m["grid"]),
                              (np.dtype(np.uint16), np.dtype(np.int32)))
            _check_range(codes, m["codebook_size"], directory / shard["codes"], "tokens")
            shard_labels = _open_npy(directory / shard["labels"], (shard["count"],), (np.dtype(np.int64),))
            _check_range(shard_labels, MAX_CLASSES, directory / shard["labels"], "class labels")
            self.codes.append(codes)
            labels.append(np.asarray(shard_labels))
        self.labels = torch.from_numpy(np.concatenate(labels))
        self.offsets = np.cumsum([0] + [len(c) for c in self.codes])
        if coarse_map is not None and (coarse_map.fingerprint != m["tokenizer_fingerprint"]
                                       or coarse_map.vocab_size != m["codebook_size"]):
            raise CtfgenError(f"the coarse map was made for another tokenizer than the codes in {directory} "
                              f"(map {coarse_map.fingerprint}, codes {m['tokenizer_fingerprint']})")

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
