"""A checked request sampled batch by batch on the pipeline's device, under one seeding rule (see `decode.py`):
image i draws its numbers from a generator seeded from its (seed, index) pair, so the batch size and the rest of
the request do not change them."""

from __future__ import annotations

from functools import partial

import torch

from ctfgen.sampling.decode import seeded_uniforms
from ctfgen.sampling.params import SamplingParams
from ctfgen.sampling.request import PipelineOutput, RunOptions, SamplingRequest, as_output_type, labels_as


def sample_request(pipe, request: SamplingRequest, options: RunOptions) -> PipelineOutput:
    """The images of a request checked against `pipe`."""
    labels = torch.tensor(request.labels)
    fine, coarse, pixels, previews = [], [], [], []
    rows = 1 + request.stage2_sampling.steps  # the autoregressive stage's numbers, then one row per stage-2 pass
    for start, batch, uniforms in batches(pipe, labels, request.image_seeds, options, f"sample[{request.mode}]", rows):
        on_step = None if options.callback is None else partial(options.callback, start)
        steps = dict(callback=on_step, callback_steps=options.callback_steps)
        if request.mode == "baseline":
            fine.append(pipe.baseline_tokens(batch, request.sampling, uniforms[:, 0], **steps))
        else:
            coarse.append(pipe.stage1_tokens(batch, request.sampling, uniforms[:, 0], **steps))
            fine.append(pipe.stage2_tokens(coarse[-1], batch, request.stage2_sampling, uniforms[:, 1:],
                                           request.restrict))
        pixels.append(pipe.decode(fine[-1]))
        if options.preview:
            previews.append(pipe.decode_preview(coarse[-1]))
    return output(options.output_type, labels, fine, coarse, pixels, previews)


def sample_variations(pipe, coarse: torch.Tensor, labels: torch.Tensor, seeds: list[tuple[int, int]],
                      stage2_sampling: SamplingParams, restrict: bool, options: RunOptions) -> PipelineOutput:
    """Stage 2 alone over checked coarse grids [N, h, w] with their class ids [N], image j with seeds[j]."""
    fine, pixels = [], []
    for start, batch, uniforms in batches(pipe, labels, seeds, options, "variations", 1 + stage2_sampling.steps):
        grids = coarse[start:start + len(batch)].to(pipe.device)
        fine.append(pipe.stage2_tokens(grids, batch, stage2_sampling, uniforms[:, 1:], restrict))
        pixels.append(pipe.decode(fine[-1]))
    return output(options.output_type, labels, fine, [coarse], pixels, [])


def batches(pipe, labels: torch.Tensor, seeds, options: RunOptions, desc: str, rows: int):
    """(first image, labels [b], uniforms [b, rows, T]) for each batch of a request, on the pipeline's device;
    image i's numbers from its (seed, index) pair seeds[i] (see `image_uniforms`)."""
    from tqdm import tqdm

    starts = range(0, len(labels), options.batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=None if options.progress else True):
        batch = labels[start:start + options.batch_size]
        uniforms = seeded_uniforms(seeds[start:start + len(batch)], pipe.grid ** 2, rows)
        yield start, batch.to(pipe.device), uniforms.to(pipe.device)


def output(output_type: str, labels, fine, coarse, pixels, previews) -> PipelineOutput:
    return PipelineOutput(as_output_type(torch.cat(pixels), output_type), labels_as(labels, output_type),
                          torch.cat(fine).cpu(), torch.cat(coarse).cpu() if coarse else None,
                          as_output_type(torch.cat(previews), output_type) if previews else None)
