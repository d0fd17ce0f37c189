"""The class-conditional GPT: LlamaGen's architecture and parameter names, with a static KV cache.

Compatible with FoundationVision/LlamaGen `autoregressive/models/gpt.py` (c2i, one class token):
a released `c2i_{B,L,XL}_*.pt` loads with strict=True (see `GPT.from_llamagen`) and computes the
same logits. The same model is the baseline (fine vocabulary V) and CTF stage 1 (coarse
vocabulary K). The blocks are reused, unmasked, by the stage-2 refiner (`refiner.py`).

Sequence layout: [class token] + image tokens in raster order. Position 0 is the class token, image
token t sits at position t + 1, and the output at position t predicts image token t.

Quirks kept on purpose for LlamaGen compatibility are marked "LlamaGen:".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import PretrainedMixin
from ..errors import CtfgenError
from ..validation import (
    MAX_CLASSES,
    MAX_LAYERS,
    MAX_TOKENS,
    MAX_VOCAB,
    MAX_WIDTH,
    PROBABILITY,
    Real,
    Whole,
    check_field_types,
    check_values,
)

CHECKPOINT_KIND = "gpt"
CLS_TOKEN_NUM = 1  # class-conditional LlamaGen uses a single class token


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


CONFIG_RULES = {
    "vocab_size": Whole(1, MAX_VOCAB), "coarse_vocab_size": Whole(1, MAX_VOCAB),  # the latter: the refiner's
    "block_size": Whole(1, MAX_TOKENS), "num_classes": Whole(1, MAX_CLASSES), "dim": Whole(1, MAX_WIDTH),
    "n_layer": Whole(1, MAX_LAYERS), "n_head": Whole(1, MAX_WIDTH), "multiple_of": Whole(1, MAX_WIDTH),
    "ffn_dim_multiplier": Real(0, 16, low_open=True), "rope_base": Real(0, low_open=True),
    "norm_eps": Real(0, 1, low_open=True), "initializer_range": Real(0, 1),
    **dict.fromkeys(["token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate",
                     "class_dropout_prob"], PROBABILITY),
}


@dataclass
class GPTConfig:
    vocab_size: int = 16384  # output (and, for the GPT, input) token vocabulary
    block_size: int = 256  # image tokens per sample: a square grid
    num_classes: int = 1000  # the embedding table has one more row: the null class for CFG
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        check_field_types(self)
        check_values(self, CONFIG_RULES)
        if self.dim % self.n_head:
            raise CtfgenError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise CtfgenError(f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE; change dim or n_head")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise CtfgenError(f"block_size {self.block_size} is not a square number of tokens (grid side x side)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int:
        """The label id of the unconditional (CFG) class: the last row of the class embedding."""
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)


# Transformer shapes; vocab_size / block_size / num_classes are set per use with gpt_config().
MODEL_SHAPES = {
    # LlamaGen's class-conditional models (111M, 343M, 775M, 1.4B with V=16384).
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    # CPU-sized, for the bundled Fashion-MNIST setup.
    "GPT-M": dict(n_layer=8, n_head=6, dim=384),
    "GPT-S": dict(n_layer=6, n_head=4, dim=256),
    "GPT-XS": dict(n_layer=2, n_head=4, dim=256),  # a third of GPT-S: a cheap stage-2 refiner
    # For tests only.
    "GPT-tiny": dict(n_layer=2, n_head=2, dim=64),
}
GPT_PRESETS = {name: GPTConfig(**shape) for name, shape in MODEL_SHAPES.items()}


def _from_preset(presets: dict, preset: str, **fields):
    if preset not in presets:
        raise CtfgenError(f"unknown model preset {preset!r}; use one of {', '.join(presets)}")
    try:
        return dataclasses.replace(presets[preset], **fields)
    except TypeError as e:
        raise CtfgenError(f"bad model option for {preset}: {e}") from None


def gpt_config(preset: str, vocab_size: int, block_size: int, num_classes: int, **overrides) -> GPTConfig:
    """A preset's shape with the data's vocabulary, grid and classes, e.g.
    `gpt_config("GPT-B", 16384, 256, 1000)` is LlamaGen's c2i GPT-B at 256px."""
    return _from_preset(GPT_PRESETS, preset, vocab_size=vocab_size, block_size=block_size,
                        num_classes=num_classes, **overrides)


# ---------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ---------------------------------------------------------------------------------------------

def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000.0,
                            cls_token_num: int = CLS_TOKEN_NUM) -> torch.Tensor:
    """cos/sin table [cls_token_num + grid_size**2, head_dim // 2, 2] in fp32.

    The first half of the rotation pairs turns with the row index, the second half with the column
    index. LlamaGen: the class token rows are zeros (cos = sin = 0), so its q and k become zero.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [head_dim // 4]
    angles = torch.outer(torch.arange(grid_size), freqs)  # [grid, head_dim // 4]
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),  # row index
                      angles[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # column index
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # [grid**2, half, 2]
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]) of x [B, S, H, D] by the table rows
    freqs_cis [S, D // 2, 2]; computed in fp32, returned in x's dtype."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xf.size(1), 1, xf.size(3), 2)
    cos, sin = f[..., 0], f[..., 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).type_as(x)


class Rotary2D(nn.Module):
    """Holds the RoPE table as a non-persistent buffer that stays fp32 when the model is cast to
    bf16/fp16 (LlamaGen keeps it fp32, and rounding it would change the logits)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self._args = (config.grid_size, config.head_dim, config.rope_base)
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(*self._args), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32 and self.freqs_cis.device.type != "meta":
            self.freqs_cis = precompute_freqs_cis_2d(*self._args).to(self.freqs_cis.device)
        return self


# ---------------------------------------------------------------------------------------------
# Blocks (shared with the refiner)
# ---------------------------------------------------------------------------------------------

class LabelEmbedder(nn.Module):
    """Class labels -> one embedding token; in training, labels become the null class (the last row)
    with probability dropout_prob, so that the model also learns the unconditional distribution."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        # LlamaGen adds the null row only when dropout_prob > 0; here it is always there.
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        """labels [B] -> [B, 1, dim]."""
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 whatever the input dtype
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static, preallocated keys and values [B, n_head, max_seq_len, head_dim], written in place."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_head: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, S, D] at positions input_pos [S]; return the first B rows of the caches."""
        k_out, v_out = self.k_cache[: k.shape[0]], self.v_cache[: k.shape[0]]
        k_out[:, :, input_pos] = k.to(k_out.dtype)
        v_out[:, :, input_pos] = v.to(v_out.dtype)
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.dim, self.n_head, self.head_dim = config.dim, config.n_head, config.head_dim
        self.causal = causal
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # q, k, v stacked
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: KVCache | None = None  # set by GPT.setup_caches

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, dim]. Without input_pos: self-attention over x (causal or not). With input_pos [S]
        and a bool mask [1, 1, S, L]: write k/v into the KV cache and attend to its first L positions."""
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               dropout_p=self.attn_dropout_p if self.training else 0.0)
        else:
            keys, values = self.kv_cache.update(input_pos, k, v)
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask,
                                               dropout_p=self.attn_dropout_p if self.training else 0.0)
        y = y.to(x.dtype).transpose(1, 2).reshape(b, s, self.dim)
        return self.resid_dropout(self.wo(y))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (training)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + SwiGLU(norm(.)). Unmasked when causal=False."""

    def __init__(self, config: GPTConfig, drop_path: float = 0.0, causal: bool = True):
        super().__init__()
        self.attention = Attention(config, causal=causal)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, input_pos, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


def drop_path_rates(config: GPTConfig) -> list[float]:
    """Stochastic depth grows linearly from 0 (first layer) to drop_path_rate (last layer)."""
    return torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()


def init_weights(model: nn.Module, std: float) -> None:
    """LlamaGen: N(0, std) for every Linear and Embedding weight, zero biases (there are none)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def drop_foreign_keys(state_dict: dict) -> dict:
    """Remove entries LlamaGen files may carry that are not weights: the RoPE table and KV caches."""
    return {k: v for k, v in state_dict.items() if k != "freqs_cis" and ".kv_cache." not in k}


# ---------------------------------------------------------------------------------------------
# The GPT
# ---------------------------------------------------------------------------------------------

class ClassConditionalTransformer(PretrainedMixin, nn.Module):
    """What the GPT and the stage-2 refiner share: a class token and token embeddings on the 2-D
    RoPE grid, transformer blocks (causal or not) and a vocab_size-way output head."""

    def __init__(self, config: GPTConfig, input_vocab_size: int, causal: bool):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(input_vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config, p, causal=causal) for p in drop_path_rates(config))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rope = Rotary2D(config)
        init_weights(self, config.initializer_range)
        nn.init.zeros_(self.output.weight)  # LlamaGen: the output layer starts at zero

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(drop_foreign_keys(state_dict), strict=strict, assign=assign)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class GPT(ClassConditionalTransformer):
    checkpoint_kind = CHECKPOINT_KIND
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__(config, config.vocab_size, causal=True)
        self.register_buffer("causal_mask", None, persistent=False)  # set by setup_caches

    # -- training / teacher-forced scoring ----------------------------------------------------

    def forward(self, idx: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] image tokens (1 <= T <= block_size), labels [B] class ids (num_classes = null).

        Returns (logits [B, T, vocab] fp32, loss or None): logits[:, t] predicts idx[:, t] from the class
        and idx[:, :t]; the last token is never read. With targets [B, T] (usually idx itself), loss
        is the mean cross-entropy (ignore_index -100). Class dropout applies in training mode.
        """
        t = idx.shape[1]
        if not 1 <= t <= self.config.block_size:
            raise ValueError(f"GPT got {t} tokens per sample; it takes 1 to block_size={self.config.block_size}")
        h = torch.cat([self.cls_embedding(labels, train=self.training), self.tok_embeddings(idx[:, :-1])], dim=1)
        h = self.tok_dropout(h)
        freqs_cis = self.rope.freqs_cis[:t]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        logits = self.output(self.norm(h)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # -- KV-cached decoding (gpt-fast style) ----------------------------------------------------

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                     device=None) -> None:
        """Preallocate a static KV cache per layer and the causal mask. max_seq_len counts the class
        token (default 1 + block_size, rounded up to a multiple of 8); dtype/device default to the
        weights'. Call again to resize; batches up to max_batch_size can then be decoded."""
        weight = self.tok_embeddings.weight
        dtype, device = dtype or weight.dtype, torch.device(device or weight.device)
        max_seq_len = find_multiple(max_seq_len or CLS_TOKEN_NUM + self.config.block_size, 8)
        cache = self.layers[0].attention.kv_cache
        if cache is not None and cache.k_cache.shape[0] == max_batch_size and cache.k_cache.shape[2] == max_seq_len \
                and cache.k_cache.dtype == dtype and cache.k_cache.device == device:
            return  # the same caches serve every batch of this shape (a captured CUDA graph keeps their addresses)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, self.config.n_head,
                                               self.config.head_dim, dtype, device)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    def forward_cached(self, input_pos: torch.Tensor, labels: torch.Tensor | None = None,
                       idx: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Run the positions input_pos [S] (sequence positions: class token = 0, image token t = t + 1)
        through the cached model, writing their keys/values into the cache in place.

        Inputs: the class token (labels [B], only when input_pos starts at 0) followed by image tokens
        idx [B, S'] (or either alone). kv_len: attend to the first kv_len cache positions (at least
        input_pos[-1] + 1); None attends to the whole cache, masked, so that every step has the same
        shapes (CUDA graphs). Returns fp32 logits [B, S, vocab]; the last row predicts the next image token.
        """
        if self.causal_mask is None:
            raise RuntimeError("call setup_caches() before cached decoding")
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels, train=self.training))
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        h = self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        mask = self.causal_mask[input_pos, : kv_len or self.causal_mask.shape[-1]][None, None]  # [1, 1, S, kv_len]
        freqs_cis = self.rope.freqs_cis[input_pos]
        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos, mask)
        return self.output(self.norm(h)).float()

    def prefill(self, labels: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Start decoding: the class token (and an optional prefix of image tokens idx [B, P]) into the
        cache. Returns logits [B, vocab] for the next image token (token P)."""
        n = CLS_TOKEN_NUM + (0 if idx is None else idx.shape[1])
        input_pos = torch.arange(n, device=labels.device)
        return self.forward_cached(input_pos, labels=labels, idx=idx, kv_len=n)[:, -1]

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """One decoding step: image token t (token [B] or [B, 1]) at sequence position input_pos =
        tensor([t + 1]), attending to the first kv_len = t + 2 cache positions (None: the whole cache,
        masked). Returns logits [B, vocab] for image token t + 1."""
        return self.forward_cached(input_pos, idx=token.view(token.shape[0], 1), kv_len=kv_len)[:, -1]

    def compile_decode_step(self) -> None:
        """Replace decode_step by a torch.compile'd one (fullgraph; kv_len becomes a dynamic size after its
        second value). On CUDA the step is captured as a CUDA graph ("reduce-overhead", as gpt-fast): every
        step has the same shapes there (kv_len None), and one launch replaces hundreds of small kernels. The
        first decode pays the compile time (~20 s for GPT-S on a CPU). Idempotent."""
        if not self.decode_step_compiled:
            cuda = self.tok_embeddings.weight.device.type == "cuda"
            self.decode_step = torch.compile(self.decode_step, fullgraph=True,
                                             mode="reduce-overhead" if cuda else None)

    @property
    def decode_step_compiled(self) -> bool:
        return "decode_step" in vars(self)  # the compiled step shadows the method on the instance

    # -- LlamaGen checkpoints ------------------------------------------------------------------

    @classmethod
    def from_llamagen(cls, path, preset: str = "GPT-B", block_size: int = 256, device="cpu",
                      **overrides) -> GPT:
        """A released LlamaGen c2i GPT (`c2i_B_256.pt`, ...). The vocabulary and class count are read
        from the weights; the preset (head count) and block_size (256 for 256px, 576 for 384px with
        VQ-16) must be given because the file does not record them."""
        state_dict = load_llamagen_state_dict(path)
        try:
            vocab_size = state_dict["tok_embeddings.weight"].shape[0]
            num_classes = state_dict["cls_embedding.embedding_table.weight"].shape[0] - 1
        except KeyError as e:
            raise CtfgenError(f"{path} is not a LlamaGen class-conditional GPT checkpoint (no {e})") from None
        model = cls(gpt_config(preset, vocab_size, block_size, num_classes, **overrides))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise CtfgenError(f"{path} does not fit preset {preset} ({str(e).splitlines()[0]}); "
                              f"pass the preset it was trained with") from None
        return model.to(device).eval()


def load_llamagen_state_dict(path) -> dict[str, torch.Tensor]:
    """The state dict of a LlamaGen `.pt` file (its "model" entry when there is one), read with
    weights_only=True, without the non-weight `freqs_cis` entry."""
    path = Path(path)
    if not path.is_file():
        raise CtfgenError(f"{path} does not exist; download the LlamaGen checkpoint or fix the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, or a pickle that would need code to load
        raise CtfgenError(f"cannot read {path} as a weights-only checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(checkpoint, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CtfgenError(f"{path} does not hold a state dict of tensors")
    return drop_foreign_keys(checkpoint)


__all__ = ["GPT", "GPTConfig", "GPT_PRESETS", "MODEL_SHAPES", "gpt_config", "load_llamagen_state_dict",
           "TransformerBlock", "Attention", "FeedForward", "RMSNorm", "LabelEmbedder", "KVCache", "Rotary2D",
           "precompute_freqs_cis_2d", "apply_rotary_emb", "find_multiple", "CLS_TOKEN_NUM"]
