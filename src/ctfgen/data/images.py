"""Image grids, PNGs (with PIL, no torchvision) and sample `.npz` files, each tagged as ctfgen's so that a later run
can tell its own earlier output from a user's file."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from ctfgen.files import write_atomic, write_dir_atomic

if TYPE_CHECKING:  # torch tensors come in; the module itself needs no torch (the CLI's output checks use it)
    import torch

PNG_TAG = ("Software", "ctfgen")
# An extra array in the .npz files ctfgen writes; readers of the ADM layout (arr_0, labels) pass over it.
NPZ_TAG = ("software", "ctfgen")


def make_grid(pixels: torch.Tensor, ncol: int, pad: int = 2, fill: int = 255) -> Image.Image:
    """uint8 images [N, 3, H, W] -> one PIL image, row-major with `ncol` columns."""
    n, c, h, w = pixels.shape
    nrow = -(-n // ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), fill, dtype=np.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = array[i]
    return Image.fromarray(canvas)


def add_row_labels(grid: Image.Image, labels: list[str], row_height: int, pad: int = 2) -> Image.Image:
    """Prefix each grid row with a text label (e.g. a class name)."""
    width = 8 + 6 * max(len(s) for s in labels)
    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        draw.text((4, pad + r * (row_height + pad) + row_height // 2 - 5), text, fill="black")
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically, tagged as ctfgen's (so that a later run can tell it from a user's file)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(*PNG_TAG)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def is_ctfgen_png(path) -> bool:
    """Whether `path` is a PNG that `save_png` wrote."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(PNG_TAG[0]) == PNG_TAG[1]
    except (OSError, ValueError):
        return False


def is_ctfgen_png_dir(directory) -> bool:
    """Whether `directory` holds nothing but PNGs that `save_png` wrote (as `save_png_dir` leaves it)."""
    return all(path.is_file() and not path.is_symlink() and is_ctfgen_png(path) for path in Path(directory).iterdir())


def save_png_dir(images, directory) -> Path:
    """Write (name, image) pairs as the PNGs of `directory`, all at once: in place of an empty directory or of
    one that `save_png_dir` wrote before (its PNGs go), never into a user's."""
    def write(tmp: Path) -> None:
        for name, image in images:
            save_png(image, tmp / name)

    return write_dir_atomic(directory, write, is_ctfgen_png_dir)


def save_npz(path, **arrays: np.ndarray) -> Path:
    """Write arrays to an .npz atomically, tagged as ctfgen's."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{NPZ_TAG[0]: np.array(NPZ_TAG[1])})

    write_atomic(path, write)
    return path


def is_ctfgen_npz(path) -> bool:
    """Whether `path` is an .npz that `save_npz` wrote: its tag array is read alone, and only when small."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{NPZ_TAG[0]}.npy")
            if info.file_size > 1024:
                return False
            with archive.open(info) as f:
                tag = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return tag.shape == () and tag.dtype.kind == "U" and str(tag) == NPZ_TAG[1]
