"""The CPU decode backend: a GPT's cached steps with their matmuls on oneDNN-packed copies of the weights.

A decode step multiplies ~128 rows by every weight matrix. At such shapes MKL's sgemm (behind F.linear) reaches about
half of this CPU's fp32 peak (105 GFLOP/s for 128 x 256 x 768 on an AVX-512 EPYC, 2 threads), while oneDNN on weights
reordered once into its blocked layout reaches 210 (fp32) and 390 (bf16, against 295 for F.linear). oneDNN also
applies an activation, or an add / product with another tensor, to the tile it has just computed, which saves the
separate elementwise kernels of the residual adds and SwiGLU. Attention over the cache is two batched matmuls
(`attention_few_queries`), not SDPA's CPU flash kernel, which is built for blocks of many queries. A step's keys and
values go into the cache as a slice copy, and in eager mode RoPE is one complex product (`rotate`): each replaces about
ten small kernels (together 13% of an eager bf16 step of GPT-S at 128 rows, in CPU time on one thread).

`PackedDecoder` runs the model's own step (`GPT.forward_cached`, `TransformerBlock.forward`) with those kernels: the
same function, tested against it (tests/test_backends.py). `ctfgen.backends.decoding` chooses it.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from ctfgen.backends.eager import compiled
from ctfgen.models.blocks import CLS_TOKEN_NUM, TransformerBlock, apply_rotary_emb
from ctfgen.models.gpt import GPT


def packed_linear_supported(dtype: torch.dtype) -> bool:
    """Whether `PackedWeights` serves weights of this dtype here: fp32, and bf16 where the CPU runs it natively."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def serves(model: GPT) -> bool:
    """Whether this backend runs the model's steps now: on the CPU, in inference (eval mode, no autograd), with
    weights of a dtype that oneDNN runs fast here."""
    weight = model.output.weight
    return (weight.device.type == "cpu" and not model.training and not torch.is_grad_enabled()
            and packed_linear_supported(weight.dtype))


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor | None, post_op: str) -> torch.Tensor:
    if other is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "swish" if post_op == "silu" else "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, post_op)


# The same as an operator that torch.compile keeps opaque (inductor has no lowering for a packed weight that it did not
# pack itself). Defined through torch.library.Library rather than @custom_op: ~3 us of dispatch a call instead of ~15.
if not hasattr(torch.ops.ctfgen, "packed_linear"):  # once per process
    _LIBRARY = torch.library.Library("ctfgen", "FRAGMENT")
    _LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? other, str post_op) -> Tensor")
    _LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
    torch.library.register_fake("ctfgen::packed_linear", lambda x, weight, other, post_op:
                                x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_LIBRARY)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor | None = None,
                  post_op: str = "none") -> torch.Tensor:
    """F.linear(x, W) (no bias) for W pre-packed by `PackedWeights`, then post_op: "none", "silu"; with other (the
    output's shape): "add" (+ other) or "mul" (* other). Inference only (no autograd)."""
    if torch.compiler.is_compiling():
        return torch.ops.ctfgen.packed_linear(x, weight, other, post_op)
    return _packed_linear(x, weight, other, post_op)  # eager: without the operator's dispatch


class BlockWeights(NamedTuple):
    """A block's matmul weights, pre-packed."""
    wqkv: torch.Tensor
    wo: torch.Tensor
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


class DecodeWeights(NamedTuple):
    """A transformer's pre-packed matmul weights: one BlockWeights per layer, and the output head."""
    layers: list[BlockWeights]
    output: torch.Tensor

    def matrices(self) -> list[torch.Tensor]:
        return [w for layer in self.layers for w in layer] + [self.output]


class PackedWeights:
    """Copies of a GPT's Linear weights in oneDNN's blocked layout, for steps of `rows` rows (oneDNN's hint for the
    layout). `get()` packs on first use and again whenever a weight has changed since (in place: an optimizer step,
    load_state_dict; or replaced: a cast, .to()) or the rows have: packed copies never go stale. They cost one more
    copy of the weights, held as long as the model."""

    def __init__(self, model: GPT):
        self.linears = [m for layer in model.layers for m in (layer.attention.wqkv, layer.attention.wo,
                                                              layer.feed_forward.w1, layer.feed_forward.w3,
                                                              layer.feed_forward.w2)] + [model.output]
        self.key, self.sources, self.packed = None, None, None

    def get(self, rows: int) -> DecodeWeights:
        weights = [m.weight for m in self.linears]
        key = [rows] + [(w.data_ptr(), w._version, w.dtype) for w in weights]
        if key != self.key:
            # The sources stay referenced, so no new weight can be allocated at one of their addresses: an equal
            # data_ptr and version then means the very same, unchanged, tensor.
            self.sources = [w.detach() for w in weights]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in self.sources]
            self.packed = DecodeWeights([BlockWeights(*packed[i:i + 5]) for i in range(0, len(packed) - 1, 5)],
                                        packed[-1])
            self.key = key
        return self.packed


# model -> its PackedWeights; an entry holds the model's Linear layers, never the model, so it goes with the model.
_PACKED: weakref.WeakKeyDictionary[GPT, PackedWeights] = weakref.WeakKeyDictionary()


def packed_weights(model: GPT, rows: int) -> DecodeWeights:
    """The model's weights packed for steps of `rows` rows, up to date (`PackedWeights`). In Python: called outside
    the compiled step."""
    if model not in _PACKED:
        _PACKED[model] = PackedWeights(model)
    return _PACKED[model].get(rows)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def attention_few_queries(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q keys^T / sqrt(D), masked) values for the few queries of a cached step, on the CPU: q [B, H, S, D],
    keys / values [B, H, L, D], bool mask [1, 1, S, L] (None: every key, as for the one query of a decode step) ->
    [B, H, S, D] in fp32 (fp64 for fp64 inputs): scores, softmax and sums in fp32 at least, as in SDPA's fused kernels.
    SDPA's CPU flash kernel is built for blocks of many queries; with one query a row it takes 1.1x (fp32) to 1.8x
    (bf16) the time of these two batched matmuls (batch 128, 4 heads, 33 keys). torch.compile fuses them into one
    pass over the keys and one over the values."""
    scores = torch.matmul(at_least_fp32(q), at_least_fp32(keys).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf"))
    if not torch.compiler.is_compiling():
        return torch.matmul(scores.softmax(-1), at_least_fp32(values))
    # Compiled, the softmax's division would sit inside the pass over the values, once per key and channel;
    # normalising the weighted sum instead divides once per channel.
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    return torch.matmul(weights, at_least_fp32(values)) / weights.sum(-1, keepdim=True)


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_emb`: in eager mode as one product of complex numbers (the pairs of x by the table's cos + i sin),
    3 kernels instead of 12; compiled, as the model writes it (inductor fuses that, and makes no code for complex)."""
    if torch.compiler.is_compiling():
        return apply_rotary_emb(x, freqs_cis)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    turns = torch.view_as_complex(freqs_cis.contiguous()).view(1, x.shape[1], 1, -1)
    return torch.view_as_real(pairs * turns).flatten(3).type_as(x)


def block_step(block: TransformerBlock, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor,
               w: BlockWeights) -> torch.Tensor:
    """`TransformerBlock.forward` of a cached step on the block's packed weights w, for the positions just before
    kv_len = mask.shape[-1]: their keys and values written in place into the cache as a slice, the residual adds and
    SwiGLU's activation and product done inside the matmuls."""
    attention, kv_len = block.attention, mask.shape[-1]
    q, k, v = attention.heads(packed_linear(block.attention_norm(x), w.wqkv), freqs_cis, rotate)
    keys, values = attention.kv_cache.k_cache[: len(x), :, :kv_len], attention.kv_cache.v_cache[: len(x), :, :kv_len]
    keys[:, :, kv_len - x.shape[1]:].copy_(k)
    values[:, :, kv_len - x.shape[1]:].copy_(v)
    one_query = x.shape[1] == 1  # a decode step: its query sees every filled position, no mask needed
    y = attention_few_queries(q.to(keys.dtype), keys, values, None if one_query else mask)
    y = y.to(x.dtype).transpose(1, 2).reshape(x.shape)
    h = packed_linear(y, w.wo, x, "add")  # x + wo(y)
    normed = block.ffn_norm(h)
    gated = packed_linear(normed, w.w3, packed_linear(normed, w.w1, post_op="silu"), "mul")  # silu(w1 n) * w3 n
    return packed_linear(gated, w.w2, h, "add")  # h + w2(gated)


def packed_forward(model: GPT, input_pos: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor | None,
                   kv_len: int, weights: DecodeWeights) -> torch.Tensor:
    """`GPT.forward_cached` on the packed weights, for the positions input_pos [S] = kv_len - S .. kv_len - 1: fp32
    logits [B, S, vocab]."""
    h = model.embed(labels, idx)
    freqs_cis, mask = model.cached_positions(input_pos, kv_len)
    for block, block_weights in zip(model.layers, weights.layers):
        h = block_step(block, h, freqs_cis, mask, block_weights)
    return packed_linear(model.norm(h), weights.output).float()


def packed_step(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                weights: DecodeWeights) -> torch.Tensor:
    """`GPT.decode_step` on the packed weights: logits [B, vocab]."""
    return packed_forward(model, input_pos, None, token.view(token.shape[0], 1), kv_len, weights)[:, -1]


class PackedDecoder:
    """A GPT's cached decoding on the CPU on packed weights: `prefill`, then one `decode_step` per token, each
    attending to the filled part of the cache only (kv_len); the step compiled (torch.compile) where asked."""

    def __init__(self, model: GPT, compile: bool):
        self.model = model
        self.step = compiled(packed_step, cuda_graphs=False) if compile else packed_step

    def prefill(self, labels: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """`GPT.prefill`: the class token (and a prefix idx [B, P]) into the cache; logits [B, vocab]."""
        n = CLS_TOKEN_NUM + (0 if idx is None else idx.shape[1])
        input_pos = torch.arange(n, device=labels.device)
        weights = packed_weights(self.model, len(labels))
        return packed_forward(self.model, input_pos, labels, idx, n, weights)[:, -1]

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`GPT.decode_step` of token [B] at position input_pos over the first kv_len cache positions."""
        return self.step(self.model, token, input_pos, kv_len, packed_weights(self.model, len(token)))

    def step_matmuls(self, rows: int):
        """(the step's matmul function, its weight matrices in the step's order), as the step runs them."""
        return packed_linear, packed_weights(self.model, rows).matrices()
