"""One sampling request shared out over the processes of torchrun (as DiT's sample_ddp.py), with one process's output.

Each process samples whole batches of the request, batch rank, rank + W, ... of a single process's batches, each
image with the (seed, index) pair it has in the whole request; rank 0 gathers the batches round by round, in a
single process's order. A batch holds the same images in the same shape as in a single process, so the result is
the same bit for bit (on the same kind of device, with the same settings and batch size), not only in distribution.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from tqdm import tqdm

from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import DEFAULT_BATCH_SIZE, whole_number
from ctfgen.sampling.request import PipelineOutput, SamplingRequest
from ctfgen.training.distributed import Runtime, gather_in_order, round_robin_batches


def sample_sharded(pipe: CTFPipeline, request: SamplingRequest, runtime: Runtime, *,
                   batch_size: int = DEFAULT_BATCH_SIZE, preview: bool = False,
                   progress: bool = False) -> PipelineOutput | None:
    """`pipe.sample(request, output_type="pt", ...)`, computed by all the processes of `runtime` together: its
    output on rank 0, None on the others."""
    request = request.check(pipe, preview)  # in every process, also those left without a batch
    batch_size = whole_number(batch_size, "batch_size", minimum=1)
    parts = []
    batches = round_robin_batches(request.count, batch_size, runtime)
    for batch in tqdm(batches, desc="sample", unit="round", disable=None if progress and runtime.is_main else True):
        part = None if batch is None else pipe.sample(request.images(batch), batch_size=batch_size, preview=preview,
                                                      output_type="pt")
        parts += gather_in_order(part, runtime)
    return concatenate(parts) if runtime.is_main else None


def concatenate(parts: list[PipelineOutput]) -> PipelineOutput:
    """The outputs ("pt") of consecutive parts of a request as the output of the whole."""
    def joined(name):
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else torch.cat(values)

    return PipelineOutput(**{f.name: joined(f.name) for f in fields(PipelineOutput)})
