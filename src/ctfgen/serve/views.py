"""What the page shows: grids of images, and the partial images of the autoregressive stage as it runs."""

from __future__ import annotations

import torch
from PIL import Image

from ctfgen.data.images import make_grid
from ctfgen.pipeline import CTFPipeline

COLUMNS = 8
BLANK = 255  # the part of a picture not sampled yet: the colour of the grid's padding
# Width over height of an image panel on a wide page: one panel spans the results column, two share it.
PANEL_ASPECT = {1: 3.3, 2: 1.6}


def columns(n: int, panels: int = 1) -> int:
    """How many of n square images to a row so that the grid, scaled to fit its panel, shows them largest (up to
    COLUMNS; the fewest columns among equals)."""
    aspect = PANEL_ASPECT[panels]
    return max(range(1, min(n, COLUMNS) + 1), key=lambda c: min(aspect / c, 1 / -(-n // c)))


def grid_image(pixels: torch.Tensor, panels: int = 1) -> Image.Image:
    """uint8 images [N, 3, H, W] -> the grid the page shows in one of `panels` side by side, at its true size
    (the page scales it up: one small PNG for each streamed frame)."""
    return make_grid(pixels, ncol=columns(len(pixels), panels))


def rows_so_far(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """The first `step` tokens of each image [n, step] -> the grid rows they reach [n, rows, grid]; a row not yet
    complete repeats its first token in the positions still to come."""
    n, step = tokens.shape
    rows = -(-step // grid)
    row_start = tokens[:, (rows - 1) * grid:(rows - 1) * grid + 1]
    return torch.cat([tokens, row_start.expand(-1, rows * grid - step)], 1).view(n, rows, grid)


def progress_pixels(pipe: CTFPipeline, mode: str, tokens: torch.Tensor) -> torch.Tensor:
    """The picture of the tokens so far [n, step], uint8 [n, 3, H, W]: the rows reached are decoded on their own
    (for CTF their coarse labels as their clusters' mean codewords: the stage-1 preview; for the baseline its fine
    tokens), the rest is left blank. Decoding only those rows costs half as much, over a whole run, as decoding
    every frame whole; the last frame is the whole grid, `pipe.decode_preview(coarse)` exactly."""
    grids = rows_so_far(tokens, pipe.grid).to(pipe.device)
    decoded = pipe.decode_preview(grids) if mode == "ctf" else pipe.decode(grids)
    pixels = torch.full((len(tokens), 3, pipe.image_size, pipe.image_size), BLANK, dtype=torch.uint8)
    pixels[:, :, :decoded.shape[2]] = decoded
    return pixels
