"""Reading ADM-layout `.npz` files: `arr_0` uint8 images [N, H, W, 3], optional `labels` [N] with the names of their
classes (`class_names`, as `ctfgen sample --npz` writes them), and for reference batches optional precomputed
statistics (`mu`, `sigma`, `mu_s`, `sigma_s`).

Anything else is refused with one line that says what is wrong; nothing is unpickled.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfgen.errors import CtfgenError

LAYOUT = "expected the ADM layout: arr_0 uint8 [N, H, W, 3] (e.g. from `ctfgen sample --npz`), optional labels [N]"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class ImageBatch:
    images: np.ndarray | None  # uint8 [N, H, W, 3]; None for a statistics-only reference
    labels: np.ndarray | None  # int64 [N]
    stats: dict[str, np.ndarray]  # precomputed ADM statistics, if any
    class_names: list[str] | None = None  # class id -> name, where the file says


def _read(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CtfgenError(f"{what} file {path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CtfgenError(f"{what} file {path} is not an .npz archive; {LAYOUT}")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if problem := _member_problem(archive, info):
                    raise CtfgenError(f"{what} file {path}: {info.filename} {problem}; {LAYOUT}")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CtfgenError(f"{what} file {path} holds Python objects (object arrays), not plain arrays; "
                              f"{LAYOUT}") from None
        raise CtfgenError(f"{what} file {path} is not a readable .npz ({e}); {LAYOUT}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise CtfgenError(f"{what} file {path} is not a readable .npz ({type(e).__name__}: {e}); {LAYOUT}") from None


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _member_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """What is wrong with one array of an .npz, read from its .npy header alone: numpy allocates the declared
    shape before reading a byte, so a shape larger than the member's data or than this machine's memory (a
    compressed bomb) must be refused first."""
    if not info.filename.endswith(".npy"):
        return "is not an array (.npy)"
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        data_bytes = info.file_size - f.tell()
    if dtype.hasobject:
        return "holds Python objects (an object array), not plain values"
    needed = math.prod(shape) * dtype.itemsize
    if needed > data_bytes:
        return f"declares {dtype} {list(shape)} ({needed} bytes) but holds {data_bytes} bytes: it is damaged"
    if needed > _memory_bytes():
        return f"declares {dtype} {list(shape)}: {needed / 2**30:.0f} GiB, more than this machine's memory"
    return None


def read_image_npz(path, what: str = "samples", allow_stats_only: bool = False) -> ImageBatch:
    """Read and check an ADM-layout file; `what` names it in errors ("samples", "reference")."""
    path = Path(path)
    arrays = _read(path, what)
    stats = {k: arrays[k] for k in STAT_KEYS if k in arrays}
    images = arrays.get("arr_0")
    if images is None:
        if allow_stats_only and "mu" in stats and "sigma" in stats:
            return ImageBatch(None, None, _check_stats(stats, path))
        raise CtfgenError(f"{what} file {path} has no images (no arr_0; it holds {', '.join(arrays) or 'nothing'}); "
                          f"{LAYOUT}")
    if images.dtype != np.uint8:
        raise CtfgenError(f"{what} file {path}: arr_0 is {images.dtype}, not uint8 pixels 0..255; {LAYOUT}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise CtfgenError(f"{what} file {path}: arr_0 has shape {list(images.shape)}, not [N, H, W, 3]; {LAYOUT}")
    if len(images) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise CtfgenError(f"{what} file {path}: arr_0 holds no images (shape {list(images.shape)})")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise CtfgenError(f"{what} file {path}: labels must be integers [N] = [{len(images)}], got {labels.dtype} "
                              f"{list(labels.shape)}")
        if len(labels) and labels.min() < 0:
            raise CtfgenError(f"{what} file {path}: labels must be class ids >= 0, found {labels.min()}")
        labels = labels.astype(np.int64)
    class_names = arrays.get("class_names")
    if class_names is not None:
        if labels is None or class_names.ndim != 1 or class_names.dtype.kind != "U" or \
                (len(labels) and labels.max() >= len(class_names)):
            raise CtfgenError(f"{what} file {path}: class_names must be strings [C], one for each class id of its "
                              f"labels, got {class_names.dtype} {list(class_names.shape)}")
        class_names = class_names.tolist()
    return ImageBatch(images, labels, _check_stats(stats, path), class_names)


def _check_stats(stats: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu_key in stats) != (sigma_key in stats):
            raise CtfgenError(f"{path} has {mu_key if mu_key in stats else sigma_key} without its partner; "
                              "an ADM reference batch has both mu and sigma (and mu_s with sigma_s)")
        if mu_key in stats:
            mu, sigma = stats[mu_key], stats[sigma_key]
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not np.issubdtype(mu.dtype, np.floating):
                raise CtfgenError(f"{path}: {mu_key} {list(mu.shape)} and {sigma_key} {list(sigma.shape)} are not a "
                                  "mean vector and its covariance matrix")
    return stats
