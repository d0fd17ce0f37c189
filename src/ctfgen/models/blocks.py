"""The transformer's parts, shared by the GPT and the stage-2 refiner (LlamaGen's, with its parameter names):
2-D RoPE, the class embedder, RMSNorm, SwiGLU, attention with a static KV cache, stochastic depth, blocks.
Pure PyTorch: the speed paths of decoding live beside the models, in `ctfgen.backends`.

Sequence layout: [class token] + image tokens in raster order; position 0 is the class token, image token t
sits at position t + 1. Quirks kept on purpose for LlamaGen compatibility are marked "LlamaGen:".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.models.config import GPTConfig

CLS_TOKEN_NUM = 1  # class-conditional LlamaGen uses a single class token


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
        q, k, v = self.heads(self.wqkv(x), freqs_cis)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout_p)
        else:
            keys, values = self.kv_cache.update(input_pos, k, v)
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.wo(y.to(x.dtype).transpose(1, 2).reshape(x.shape)))

    def heads(self, qkv: torch.Tensor, freqs_cis: torch.Tensor,
              rotate=apply_rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked projections qkv [B, S, 3 * dim] -> q, k, v [B, H, S, D], q and k rotated (in one call; a decode
        backend may bring a rotation of its own that computes the same)."""
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, 3, self.n_head, self.head_dim)
        qk = rotate(qkv[:, :, :2].flatten(2, 3), freqs_cis).transpose(1, 2)  # [B, 2H, S, D]
        return qk[:, : self.n_head], qk[:, self.n_head:], qkv[:, :, 2].transpose(1, 2)


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
