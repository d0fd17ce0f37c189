"""The class-conditional GPT: LlamaGen's architecture and parameter names, with a static KV cache.

Compatible with FoundationVision/LlamaGen `autoregressive/models/gpt.py` (c2i, one class token):
a released `c2i_{B,L,XL}_*.pt` loads with strict=True (see `llamagen.py`) and computes the
same logits. The same model is the baseline (fine vocabulary V) and CTF stage 1 (coarse
vocabulary K). Its parts are in `blocks.py`; `ClassConditionalTransformer` is what it shares with
the stage-2 refiner (`refiner.py`), which runs the same blocks unmasked.

Sequence layout: [class token] + image tokens in raster order. Position 0 is the class token, image
token t sits at position t + 1, and the output at position t predicts image token t.

Quirks kept on purpose for LlamaGen compatibility are marked "LlamaGen:".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.checkpoint import PretrainedMixin
from ctfgen.models.blocks import (
    CLS_TOKEN_NUM,
    KVCache,
    LabelEmbedder,
    RMSNorm,
    Rotary2D,
    TransformerBlock,
)
from ctfgen.models.config import GPTConfig, find_multiple

CHECKPOINT_KIND = "gpt"


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
    """Remove entries LlamaGen's state dicts may carry that are not weights: the RoPE table and KV caches."""
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

    def check_length(self, n_tokens: int) -> None:
        """Refuse a grid of n_tokens image tokens per sample outside 1..block_size."""
        if not 1 <= n_tokens <= self.config.block_size:
            raise ValueError(f"{type(self).__name__} got {n_tokens} tokens per sample; it takes 1 to "
                             f"block_size={self.config.block_size}")

    def embed(self, labels: torch.Tensor | None, tokens: torch.Tensor | None,
              extra: torch.Tensor | None = None) -> torch.Tensor:
        """The class token (labels [B]; class dropout in training) followed by the embeddings of tokens [B, S]
        (either may be None; `extra` [B, S, dim] is added to the tokens' embeddings): [B, 1 + S, dim] (or
        [B, S] / [B, 1]), through the token dropout."""
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels, train=self.training))
        if tokens is not None:
            parts.append(self.tok_embeddings(tokens) if extra is None else self.tok_embeddings(tokens) + extra)
        return self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def hidden_states(self, labels: torch.Tensor, tokens: torch.Tensor,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
        """The class token and tokens [B, S] (plus `extra` embeddings, see `embed`) at sequence positions 0..S
        through every block (uncached): the hidden states [B, 1 + S, dim] before the final norm."""
        h = self.embed(labels, tokens, extra)
        freqs_cis = self.rope.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return h

    def logits_and_loss(self, normed: torch.Tensor, targets: torch.Tensor | None):
        """(fp32 logits [B, T, vocab] of the normalised hidden states [B, T, dim], and with targets [B, T] the mean
        cross-entropy (ignore_index -100), else None)."""
        logits = self.output(normed).float()
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


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
        self.check_length(idx.shape[1])
        return self.logits_and_loss(self.norm(self.hidden_states(labels, idx[:, :-1])), targets)

    # -- KV-cached decoding (gpt-fast style); the sampler runs it through `ctfgen.backends.decoding` -------------

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
        h = self.embed(labels, idx)
        freqs_cis, mask = self.cached_positions(input_pos, kv_len)
        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos, mask)
        return self.output(self.norm(h)).float()

    def cached_positions(self, input_pos: torch.Tensor, kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE rows [S, head_dim // 2, 2] of the positions input_pos [S], and their bool mask [1, 1, S, kv_len]
        over the cache (kv_len None: the whole cache)."""
        if self.causal_mask is None:
            raise RuntimeError("call setup_caches() before cached decoding")
        mask = self.causal_mask[input_pos, : kv_len or self.causal_mask.shape[-1]][None, None]
        return self.rope.freqs_cis[input_pos], mask

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
