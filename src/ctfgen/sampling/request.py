"""A sampling request, checked whole before anything runs, and what it gives back.

Classes come by id or by name; counts, batch sizes and settings are whole or finite numbers in range.
Every refusal is a `CtfgenError` saying what is wrong and what to pass instead.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ctfgen.errors import CtfgenError
from ctfgen.sampling.params import SamplingParams, whole_number

OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class PipelineOutput:
    """Image i is the i-th of the request. `images` (and `previews`) come as `output_type` asks: a list of
    PIL images ("pil"), a uint8 tensor [N, 3, H, W] ("pt") or a uint8 array [N, H, W, 3] ("np"); `labels`
    as a list of ints, a LongTensor or an int64 array."""

    images: list[Image.Image] | torch.Tensor | np.ndarray
    labels: list[int] | torch.Tensor | np.ndarray  # the class id of each image
    tokens: torch.Tensor  # fine token grids, LongTensor [N, h, w]
    coarse: torch.Tensor | None = None  # CTF: the stage-1 coarse grids [N, h, w]
    previews: list[Image.Image] | torch.Tensor | np.ndarray | None = None  # stage 1 alone (cluster-mean codewords)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def as_output_type(pixels: torch.Tensor, output_type: str):
    """uint8 pixels [N, 3, H, W] -> PIL images, the tensor itself, or a [N, H, W, 3] array."""
    if output_type == "pt":
        return pixels
    if output_type == "np":
        return pixels.permute(0, 2, 3, 1).numpy()
    return to_pil(pixels)


def labels_as(labels: torch.Tensor, output_type: str):
    """Class ids [N] -> a list of ints, the tensor itself, or an int64 array."""
    if output_type == "pt":
        return labels
    return labels.numpy() if output_type == "np" else labels.tolist()


def class_ids(classes, class_names: list[str]) -> list[int]:
    """Class ids from one class or a sequence (list, range, array, tensor) of them, each an id (an int, or a
    float or string holding a whole number) or a name from `class_names`."""
    if isinstance(classes, (str, numbers.Number)):
        classes = [classes]
    elif isinstance(classes, (torch.Tensor, np.ndarray)):
        classes = classes.flatten().tolist()
    ids = [class_id(c, class_names) for c in classes]
    if not ids:
        raise CtfgenError(f"no classes given; pass class ids or names, e.g. [0, 1] or [{class_names[0]!r}]")
    return ids


def class_id(c, class_names: list[str]) -> int:
    if isinstance(c, (torch.Tensor, np.ndarray)) and c.ndim == 0:
        c = c.item()
    if isinstance(c, str) and c.strip() in class_names:
        return class_names.index(c.strip())
    n = len(class_names)
    try:
        c = whole_number(int(c) if isinstance(c, str) else c, "class id")
    except (CtfgenError, ValueError):
        names = ", ".join(class_names) if n <= 20 else "see pipe.class_names"
        raise CtfgenError(f"class {c!r} is neither a class id (0..{n - 1}) nor a class name ({names})") from None
    if not 0 <= c < n:
        raise CtfgenError(f"class id {c} is out of range; this model has classes 0..{n - 1}")
    return c


def check_sampling(params, what: str, vocab: int) -> None:
    if not isinstance(params, SamplingParams):
        raise CtfgenError(f"{what} must be a SamplingParams, got {type(params).__name__}")
    if params.top_k > vocab:
        raise CtfgenError(f"{what}: top_k must be between 0 (off) and the vocabulary size {vocab}, got {params.top_k}")


def check_stage2(params, vocab: int) -> None:
    check_sampling(params, "stage2_sampling", vocab)
    if params.cfg_interval != -1:
        raise CtfgenError("stage 2 predicts every token in one pass: cfg_interval is for stage 1 only; "
                          "leave stage2_sampling.cfg_interval at -1")


def check_batching(batch_size, output_type: str) -> int:
    if output_type not in OUTPUT_TYPES:
        raise CtfgenError(f"unknown output_type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    return whole_number(batch_size, "batch_size", minimum=1)


def check_callback(callback, callback_steps) -> int:
    if callback is not None and not callable(callback):
        raise CtfgenError(f"callback must be callable, got {type(callback).__name__}")
    return whole_number(callback_steps, "callback_steps", minimum=1)


def check_coarse(coarse, grid: int, k: int) -> torch.Tensor:
    """Coarse grids [N, grid, grid] with labels in [0, k), as a LongTensor on the CPU."""
    coarse = torch.as_tensor(coarse)
    if coarse.dim() != 3 or coarse.shape[1:] != (grid, grid) or coarse.is_floating_point() or coarse.is_complex():
        raise CtfgenError(f"coarse grids must be integer labels of shape [N, {grid}, {grid}], got {coarse.dtype} "
                          f"{list(coarse.shape)}; pass out.coarse of a CTF request")
    if len(coarse) == 0 or coarse.min() < 0 or coarse.max() >= k:
        raise CtfgenError(f"coarse grids must be at least one grid of labels 0..{k - 1} (this pipeline's coarse map)")
    return coarse.long().cpu()
