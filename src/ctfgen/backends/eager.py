"""The plain decode backend: a GPT's cached steps as the model computes them (`GPT.prefill`, `GPT.decode_step`), and
the compile policy of decode steps, shared with the CPU backend (`cpu_decode.py`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ctfgen.models.gpt import GPT


@functools.cache
def compiled(step, cuda_graphs: bool):
    """torch.compile of a decode step function(model, ...) (fullgraph; kv_len becomes a dynamic size after its second
    value). With cuda_graphs the step is captured as a CUDA graph ("reduce-overhead", as gpt-fast): one launch
    replaces hundreds of small kernels, which needs every step to have the same shapes. One compiled function per
    step function: models are told apart by dynamo's guards. The first decode pays the compile time (~20 s for GPT-S
    on a CPU)."""
    return torch.compile(step, fullgraph=True, mode="reduce-overhead" if cuda_graphs else None)


def eager_step(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None) -> torch.Tensor:
    return model.decode_step(token, input_pos, kv_len)


class EagerDecoder:
    """A GPT's cached decoding by the model itself: `prefill`, then one `decode_step` per token; the step compiled
    (torch.compile) where asked. On GPUs every step attends to the whole masked cache, so that its shapes never
    change (CUDA graphs); elsewhere to the filled part only."""

    def __init__(self, model: GPT, compile: bool):
        self.model = model
        self.static_shapes = model.output.weight.device.type == "cuda"
        self.step = compiled(eager_step, cuda_graphs=self.static_shapes) if compile else eager_step

    def prefill(self, labels: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.prefill(labels, idx)

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits [B, vocab] of the step of token [B] at position input_pos, kv_len cache positions filled."""
        return self.step(self.model, token, input_pos, None if self.static_shapes else kv_len)

    def step_matmuls(self, rows: int):
        """(the step's matmul function, its weight matrices in the step's order), as the step runs them."""
        weights = [m.weight for layer in self.model.layers for m in (
            layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w3,
            layer.feed_forward.w2)]
        return F.linear, weights + [self.model.output.weight]
