"""Re-roll the details of an image: keep its coarse labels, sample stage 2 again.

A generated image brings its coarse grid (`out.coarse`); any other image is tokenized by the pipeline's
tokenizer first and its fine tokens mapped to their clusters. `CTFPipeline.variations` then samples new fine
tokens within the same clusters: the same layout, new detail. The CLI (`ctfgen reroll`) and the web demo
read images and lay out their results here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ctfgen.data.datasets import FMNIST_PAD, FMNIST_SIDE
from ctfgen.data.images import make_grid
from ctfgen.errors import CtfgenError
from ctfgen.pipeline import CTFPipeline


def read_image(path, size: int) -> torch.Tensor:
    """An image file as uint8 [3, size, size]: one of the tokenizer's size as it is, or a 28x28 one (Fashion-MNIST's
    size) for a 32x32 tokenizer padded with black as the training images were. Grey images get three equal
    channels. Anything else is refused with a message, before its pixels are decoded."""
    name = Path(path).name
    try:
        with Image.open(path) as image:
            side = FMNIST_SIDE if size == FMNIST_SIDE + 2 * FMNIST_PAD else size
            if image.size not in ((size, size), (side, side)):
                sizes = f"{size}x{size}" + (f" or {side}x{side}" if side != size else "")
                raise CtfgenError(f"{name} is {image.width}x{image.height}; this pipeline's tokenizer takes "
                                  f"{sizes} images")
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise CtfgenError(f"{path}: no such file; give the path of a PNG or JPEG image") from None
    except IsADirectoryError:
        raise CtfgenError(f"{path} is a folder; give the path of a PNG or JPEG image") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise CtfgenError(f"{name} is not an image that can be read (PNG, JPEG, ...)") from None
    pad = (size - pixels.shape[0]) // 2
    return torch.nn.functional.pad(torch.from_numpy(pixels.copy()).permute(2, 0, 1), (pad,) * 4, value=0)


def coarse_of_images(pipe: CTFPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> the coarse labels [B, h, w] of their tokens, for `pipe.variations`."""
    if pipe.coarse_map is None:
        raise CtfgenError("re-rolling keeps the coarse labels and samples stage 2 again; this pipeline has no "
                          "CTF stages")
    return pipe.coarse_map.coarse_of_fine[pipe.encode(pixels)]


def reroll_grid(originals: torch.Tensor, previews: torch.Tensor, variations: torch.Tensor) -> Image.Image:
    """A row per image: the original, its coarse labels decoded (the layout kept), then its variations."""
    n = len(variations) // len(originals)
    rows = [torch.cat([original[None], preview[None], variations[i * n:(i + 1) * n]])
            for i, (original, preview) in enumerate(zip(originals, previews))]
    return make_grid(torch.cat(rows), ncol=n + 2)
