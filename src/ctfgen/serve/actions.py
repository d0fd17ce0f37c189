"""The page's actions as plain Python, no gradio: generate (streamed), re-roll a generated or an uploaded image.

The page's values come in as the widgets give them (floats for numbers, None for an empty box) and are checked
here, whole, before anything is queued: a bad request gets a `CtfgenError` with the message to show, and never
reaches a sampler call that it shares with other users.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ctfgen.errors import CtfgenError
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import SamplingParams, whole_number
from ctfgen.sampling.request import SamplingRequest
from ctfgen.sampling.reroll import coarse_of_images, read_image, reroll_grid
from ctfgen.serve.batcher import Batcher, Progress
from ctfgen.serve.limits import Limits
from ctfgen.serve.views import grid_image, progress_pixels

MODES = {"CTF": ("ctf",), "Baseline": ("baseline",), "Both": ("ctf", "baseline")}
TITLES = {"ctf": "CTF", "baseline": "baseline"}


@dataclass
class Timing:
    mode: str
    images: int
    first_preview_s: float | None = None
    final_s: float | None = None


@dataclass
class Frame:
    """One update of the page: the image shown for each mode, the timing table, and (once CTF is done) what a
    re-roll needs of the result."""

    images: dict[str, Image.Image | None]
    timings: list[Timing] = field(default_factory=list)
    status: str = ""
    result: dict | None = None

    def stats(self) -> str:
        lines = ["| | images | first preview | final image | images/s |", "| --- | --- | --- | --- | --- |"]
        for t in self.timings:
            first = "" if t.first_preview_s is None else f"{t.first_preview_s:.2f} s"
            final, rate = ("", "") if t.final_s is None else (f"{t.final_s:.2f} s", f"{t.images / t.final_s:.1f}")
            lines.append(f"| {TITLES[t.mode]} | {t.images} | {first} | {final} | {rate} |")
        return "\n".join(lines + ([f"\n{self.status}"] if self.status else []))


class Demo:
    def __init__(self, pipe: CTFPipeline, limits: Limits = Limits()):
        self.pipe, self.limits = pipe, limits
        self.batcher = Batcher(pipe, max_batch=limits.max_batch, max_waiting=limits.max_queue,
                               preview=partial(progress_pixels, pipe))
        self.modes = [name for name, modes in MODES.items() if all(self.has(m) for m in modes)]
        self._files = Path(tempfile.mkdtemp(prefix="ctfgen-serve-"))

    def has(self, mode: str) -> bool:
        return (self.pipe.stage1 if mode == "ctf" else self.pipe.baseline) is not None

    def close(self) -> None:
        self.batcher.close()
        shutil.rmtree(self._files, ignore_errors=True)

    # -- generate ------------------------------------------------------------------------------

    def requests(self, classes, one_of_each, per_class, seed, mode, cfg_scale, temperature, top_k,
                 stage2_temperature, stage2_top_k, stage2_steps=1) -> list[SamplingRequest]:
        """The page's form as one request per mode, each checked whole (the form's words for its boxes)."""
        if mode not in self.modes:
            raise CtfgenError(f"choose one of {', '.join(self.modes)}")
        if not classes and not one_of_each:
            raise CtfgenError("pick at least one class (or one of each)")
        per_class = whole_number(_number(per_class, "images of each class"), "images of each class", minimum=1)
        sampling = _params("stage 1", temperature=temperature, top_k=_number(top_k, "stage-1 top-k"),
                           cfg_scale=cfg_scale)
        stage2 = _stage2_params(stage2_temperature, stage2_top_k, stage2_steps)
        requests = [SamplingRequest(range(self.pipe.num_classes) if one_of_each else classes, per_class, m, sampling,
                                    stage2, seed=_number(seed, "seed")).check(self.pipe) for m in MODES[mode]]
        total = requests[0].count
        if total > self.limits.max_images:
            raise CtfgenError(f"{total} images asked for ({len(requests[0].classes)} classes x {per_class}); one "
                              f"request may ask for at most {self.limits.max_images}")
        return requests

    def generate(self, *form):
        """Frames of the page while the request runs: the streamed partial images of each mode (CTF: the
        stage-1 preview), then its final images; modes one after the other, each timed from its submission."""
        requests = self.requests(*form)
        frame = Frame({r.mode: None for r in requests})
        for request in requests:
            timing = Timing(request.mode, request.count)
            frame.timings.append(timing)
            tic = time.perf_counter()
            job = self.batcher.submit(request)
            for update in job.updates():
                if isinstance(update, Progress):
                    frame.images[request.mode] = grid_image(update.pixels, len(requests))
                    if timing.first_preview_s is None:
                        timing.first_preview_s = time.perf_counter() - tic
                    frame.status = f"{TITLES[request.mode]}: {update.step} of {self.pipe.grid ** 2} tokens"
                else:
                    frame.images[request.mode] = grid_image(update.images, len(requests))
                    timing.final_s = time.perf_counter() - tic
                    frame.status = "done" if request is requests[-1] else ""
                    if request.mode == "ctf":
                        frame.result = {"coarse": update.coarse, "labels": update.labels, "images": update.images}
                yield frame

    # -- re-roll -------------------------------------------------------------------------------

    def reroll_generated(self, result, index, n, seed, stage2_temperature, stage2_top_k, stage2_steps=1):
        """Variations of image `index` (from 1) of the last CTF result: its coarse labels, new stage-2 detail.
        Returns the grid (the image, its coarse preview, the variations) and a .npz of their tokens."""
        if not result:
            raise CtfgenError("generate CTF images first (or re-roll an uploaded image)")
        count = len(result["labels"])
        i = whole_number(_number(index, "image number"), "image number", minimum=1) - 1
        if i >= count:
            raise CtfgenError(f"image number {i + 1} is out of range; the last CTF result has images 1 to {count}")
        return self._reroll(result["coarse"][i:i + 1], result["labels"][i:i + 1], result["images"][i:i + 1],
                            n, seed, stage2_temperature, stage2_top_k, stage2_steps)

    def reroll_upload(self, path, class_name, n, seed, stage2_temperature, stage2_top_k, stage2_steps=1):
        """Variations of an uploaded image, tokenized by the pipeline's tokenizer, as a `class_name` image."""
        if not self.has("ctf"):
            raise CtfgenError("re-rolling samples stage 2 again; this pipeline has no CTF stages")
        if not path:
            raise CtfgenError("upload an image first")
        if not class_name:
            raise CtfgenError("choose the class of the uploaded image")
        pixels = read_image(path, self.pipe.image_size)[None]
        label = self.pipe.class_ids([class_name])
        with self.batcher.pipeline() as pipe:
            coarse = coarse_of_images(pipe, pixels)
        return self._reroll(coarse, label, pixels, n, seed, stage2_temperature, stage2_top_k, stage2_steps)

    def _reroll(self, coarse, labels, originals, n, seed, stage2_temperature, stage2_top_k, stage2_steps):
        n = whole_number(_number(n, "variations"), "variations", minimum=1)
        if n > self.limits.max_images:
            raise CtfgenError(f"{n} variations asked for; one request may ask for at most {self.limits.max_images}")
        stage2 = _stage2_params(stage2_temperature, stage2_top_k, stage2_steps)
        with self.batcher.pipeline() as pipe:
            out = pipe.variations(coarse, labels, n=n, stage2_sampling=stage2, seed=_number(seed, "re-roll seed"),
                                  output_type="pt")
            previews = pipe.decode_preview(coarse)
        grid = reroll_grid(originals, previews, out.images)
        path = Path(tempfile.mkdtemp(dir=self._files)) / "variations.npz"
        np.savez(path, images=out.images.permute(0, 2, 3, 1).numpy(), labels=out.labels.numpy(),
                 tokens=out.tokens.numpy(), coarse=out.coarse.numpy())
        return grid, str(path)


def _number(value, what: str):
    """A number box's value: None when it was left empty."""
    if value is None or value == "":
        raise CtfgenError(f"give a value for {what}")
    return value


def _params(stage: str, **values) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except CtfgenError as e:
        raise CtfgenError(f"{stage}: {e}") from None


def _stage2_params(temperature, top_k, steps) -> SamplingParams:
    return _params("stage 2", temperature=temperature, top_k=_number(top_k, "stage-2 top-k"),
                   steps=_number(steps, "stage-2 steps"))
