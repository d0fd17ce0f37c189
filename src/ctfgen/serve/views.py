"""What the page shows: grids of images, and the partial images of the autoregressive stage as it runs."""

from __future__ import annotations

import torch
from PIL import Image

from ..images import make_grid
from ..pipeline import CTFPipeline

SCALE = 4  # 32x32 samples are shown 4x, each pixel a 4x4 block (nearest: the page shows the exact pixels)
COLUMNS = 8


def scaled(image: Image.Image) -> Image.Image:
    return image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)


def grid_image(pixels: torch.Tensor) -> Image.Image:
    """uint8 images [N, 3, H, W] -> the grid the page shows, at most COLUMNS to a row."""
    return scaled(make_grid(pixels, ncol=min(len(pixels), COLUMNS)))


def partial_grids(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """The first `step` tokens of each image [n, step] -> full grids [n, grid, grid]: the positions not yet
    sampled repeat the first token (a corner, background in most images), so the picture grows row by row."""
    rest = tokens[:, :1].expand(-1, grid * grid - tokens.shape[1])
    return torch.cat([tokens, rest], 1).view(-1, grid, grid)


def progress_pixels(pipe: CTFPipeline, mode: str, tokens: torch.Tensor) -> torch.Tensor:
    """The picture of the tokens so far [n, step]: for CTF the coarse labels as their clusters' mean codewords
    (the stage-1 preview), for the baseline its fine tokens as they are."""
    grids = partial_grids(tokens, pipe.grid).to(pipe.device)
    return pipe.decode_preview(grids) if mode == "ctf" else pipe.decode(grids)
