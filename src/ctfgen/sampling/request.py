"""A sampling request, checked whole before anything runs, and what it gives back.

`SamplingRequest` is what every consumer (the pipeline call, the CLI, the web page, sharded sampling) asks for,
checked by one `check(pipe)`. Classes come by id or by name; counts, batch sizes and settings are whole or finite
numbers in range. Every refusal is a `CtfgenError` saying what is wrong and what to pass instead.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from ctfgen.errors import CtfgenError
from ctfgen.sampling.params import (
    DEFAULT_BATCH_SIZE,
    STAGE1_DEFAULTS,
    STAGE2_DEFAULTS,
    SamplingParams,
    whole_number,
)
from ctfgen.validation import MAX_SEED

OUTPUT_TYPES = ("pil", "pt", "np")
MODES = ("ctf", "baseline")


@dataclass(frozen=True)
class SamplingRequest:
    """What to sample: `per_class` images of each of `classes` (ids or names; one, or a list, range, array or
    tensor of them), class after class, by `mode` ("ctf": stage 1, stage 2, decode; "baseline": the plain GPT
    over fine tokens) with stage 1's (or the baseline's) `sampling` and stage 2's `stage2_sampling`;
    `restrict=False` lets stage 2 leave the cluster (an ablation).

    Seeding: image i draws its random numbers from a generator of its own, seeded from (seed, i), so the batch
    size and the other images do not change them. `seed` is a whole number 0 .. 2**32 - 1 (MAX_SEED): in that
    range every (seed, i) pair draws numbers of its own (see `sampling/decode.py`). Or one (seed, index) pair per
    image: image `index` of the request with that seed (how a server merges the requests of several users).

    Made, a request is checked as far as it can be alone; `check(pipe)` checks it against a pipeline and names
    its classes by id."""

    classes: tuple
    per_class: int = 1
    mode: str = "ctf"
    sampling: SamplingParams = STAGE1_DEFAULTS
    stage2_sampling: SamplingParams = STAGE2_DEFAULTS
    restrict: bool = True
    seed: int | tuple[tuple[int, int], ...] = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise CtfgenError(f"unknown mode {self.mode!r}; use 'ctf' or 'baseline'")
        check_type(self.sampling, "sampling")
        if self.sampling.steps != 1:
            raise CtfgenError("steps is for stage 2 (stage2_sampling.steps); stage 1 and the baseline sample one "
                              "token a step: leave sampling.steps at 1")
        check_stage2(self.stage2_sampling)
        classes, per_class = as_tuple(self.classes), whole_number(self.per_class, "per_class", minimum=1)
        checked = {"classes": classes, "per_class": per_class, "restrict": bool(self.restrict),
                   "seed": checked_seeds(self.seed, len(classes) * per_class)}
        for name, value in checked.items():  # frozen: store the normalised values
            object.__setattr__(self, name, value)

    def check(self, pipe, preview: bool = False) -> SamplingRequest:
        """This request with class ids for its classes, or a CtfgenError if `pipe` cannot sample it (with the
        stage-1 preview too, if `preview`)."""
        classes = tuple(class_ids(self.classes, pipe.class_names))
        ctf = self.mode == "ctf"
        model = pipe.stage1 if ctf else pipe.baseline
        if model is None:
            raise CtfgenError(f"this pipeline has no {'CTF stages' if ctf else 'baseline model'}; use "
                              f"mode={'baseline' if ctf else 'ctf'!r}")
        if preview and not ctf:
            raise CtfgenError("preview needs the CTF stages (mode='ctf')")
        check_top_k(self.sampling, "stage 1" if ctf else "baseline", model.config.vocab_size)
        if ctf:
            check_stage2_against(self.stage2_sampling, pipe)
        return replace(self, classes=classes)

    @property
    def count(self) -> int:
        """How many images the request asks for."""
        return len(self.classes) * self.per_class

    @cached_property
    def labels(self) -> tuple:
        """The class of each image, in order: each class `per_class` times."""
        return tuple(c for c in self.classes for _ in range(self.per_class))

    @cached_property
    def image_seeds(self) -> tuple[tuple[int, int], ...]:
        """The (seed, index) pair of each image."""
        if isinstance(self.seed, tuple):
            return self.seed
        return tuple((self.seed, i) for i in range(self.count))

    def images(self, index: range) -> SamplingRequest:
        """Images `index` of this request as a request of their own: each draws what it draws here."""
        return replace(self, classes=tuple(self.labels[i] for i in index), per_class=1,
                       seed=tuple(self.image_seeds[i] for i in index))

    @property
    def settings(self) -> tuple:
        """How the images are drawn, whichever they are: requests with equal settings can share a sampler call."""
        return self.mode, self.sampling, self.stage2_sampling, self.restrict


def merged(requests: list[SamplingRequest]) -> SamplingRequest:
    """One request of the images of `requests` (equal settings), in order, each with its own (seed, index)."""
    if len({r.settings for r in requests}) != 1:
        raise CtfgenError("only requests with the same settings can be sampled together")
    return replace(requests[0], classes=tuple(c for r in requests for c in r.labels), per_class=1,
                   seed=tuple(pair for r in requests for pair in r.image_seeds))


def as_tuple(classes) -> tuple:
    """One class or a sequence (list, range, array, tensor) of them, as a tuple."""
    if isinstance(classes, (str, numbers.Number)):
        return (classes,)
    if isinstance(classes, (torch.Tensor, np.ndarray)):
        return tuple(classes.flatten().tolist())
    return tuple(classes)


def checked_seeds(seed, count: int) -> int | tuple[tuple[int, int], ...]:
    """A request's seed, or its `count` (seed, index) pairs."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise CtfgenError(f"{len(seed)} per-image seeds for {count} images; give one (seed, index) pair per image")
        return tuple(seed_pair(pair) for pair in seed)
    return check_seed(seed)


def check_seed(seed, what: str = "seed") -> int:
    """A seed: a whole number 0 .. MAX_SEED (2**32 - 1), the range in which (seed, index) pairs draw apart."""
    seed = whole_number(seed, what)
    if not 0 <= seed <= MAX_SEED:
        raise CtfgenError(f"{what} must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def seed_pair(pair) -> tuple[int, int]:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise CtfgenError(f"a per-image seed is a (seed, index) pair, got {pair!r}")
    return check_seed(pair[0]), check_seed(pair[1], "image index")


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
    ids = [class_id(c, class_names) for c in as_tuple(classes)]
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


def check_type(params, what: str) -> None:
    if not isinstance(params, SamplingParams):
        raise CtfgenError(f"{what} must be a SamplingParams, got {type(params).__name__}")


def check_stage2(params) -> None:
    check_type(params, "stage2_sampling")
    if params.cfg_interval != -1:
        raise CtfgenError("stage 2 predicts every token in one pass: cfg_interval is for stage 1 only; "
                          "leave stage2_sampling.cfg_interval at -1")


def check_stage2_steps(params: SamplingParams, refiner) -> None:
    if params.steps > 1 and refiner.fine_embeddings is None:
        raise CtfgenError(f"stage 2 in {params.steps} steps needs a refiner trained with --reveal (it reads the fine "
                          f"tokens kept so far); this pipeline's refiner samples in one pass: use steps=1")


def check_stage2_against(params: SamplingParams, pipe) -> None:
    """What a pipeline's stage 2 can sample: top_k within its codebook, several passes only with a --reveal refiner."""
    check_top_k(params, "stage 2", pipe.tokenizer.config.codebook_size)
    check_stage2_steps(params, pipe.stage2)


def check_top_k(params: SamplingParams, stage: str, vocab: int) -> None:
    if params.top_k > vocab:
        raise CtfgenError(f"{stage}: top_k must be between 0 (off) and the vocabulary size {vocab}, got {params.top_k}")


@dataclass(frozen=True)
class RunOptions:
    """How a request runs, not which images it gives: images per batch, the type of the output, the stage-1 preview
    too, `callback(first, step, tokens)` every `callback_steps` tokens of the autoregressive stage, a progress bar."""

    batch_size: int = DEFAULT_BATCH_SIZE
    output_type: str = "pil"
    preview: bool = False
    callback: Callable | None = None
    callback_steps: int = 1
    progress: bool = False

    def __post_init__(self):
        if self.output_type not in OUTPUT_TYPES:
            raise CtfgenError(f"unknown output_type {self.output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
        if self.callback is not None and not callable(self.callback):
            raise CtfgenError(f"callback must be callable, got {type(self.callback).__name__}")
        object.__setattr__(self, "batch_size", whole_number(self.batch_size, "batch_size", minimum=1))
        object.__setattr__(self, "callback_steps", whole_number(self.callback_steps, "callback_steps", minimum=1))


def check_coarse(coarse, grid: int, k: int) -> torch.Tensor:
    """Coarse grids [N, grid, grid] with labels in [0, k), as a LongTensor on the CPU."""
    coarse = torch.as_tensor(coarse)
    if coarse.dim() != 3 or coarse.shape[1:] != (grid, grid) or coarse.is_floating_point() or coarse.is_complex():
        raise CtfgenError(f"coarse grids must be integer labels of shape [N, {grid}, {grid}], got {coarse.dtype} "
                          f"{list(coarse.shape)}; pass out.coarse of a CTF request")
    if len(coarse) == 0 or coarse.min() < 0 or coarse.max() >= k:
        raise CtfgenError(f"coarse grids must be at least one grid of labels 0..{k - 1} (this pipeline's coarse map)")
    return coarse.long().cpu()
