"""Image grids and PNG writing with PIL (no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from .checkpoint import write_atomic

PNG_TAG = ("Software", "ctfgen")


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
