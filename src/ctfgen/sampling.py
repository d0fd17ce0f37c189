"""Sampling: KV-cached autoregressive decoding with classifier-free guidance, and the stage-2 pass.

The decode loop reads like gpt-fast's generate.py: prefill the class token into a static cache,
then one token per step at a fixed shape. Guidance follows LlamaGen: the batch is doubled with the
null class, and logits = uncond + cfg_scale * (cond - uncond) (only for the first `cfg_interval`
tokens when that is set).
"""

from __future__ import annotations

import torch

from .models.gpt import GPT
from .models.refiner import Refiner


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [..., V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return sample_categorical(probs, generator)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs [..., V] by inverting the cumulative distribution: one uniform number
    per row. On the CPU this is ~40x faster than torch.multinomial, which draws V exponentials per row
    (8 ms for 64 x 4096 here, a fifth of a decode step)."""
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    # u * total may round up to total; keep it below, so the first cdf entry above it is a token with p > 0.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Rows [cond; uncond] -> uncond + cfg_scale * (cond - uncond)."""
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def with_null_class(labels: torch.Tensor, null_class: int) -> torch.Tensor:
    return torch.cat([labels, torch.full_like(labels, null_class)])


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, *, cfg_scale: float = 1.0, cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample block_size tokens per label with a static KV cache. Returns LongTensor [B, T]."""
    b, n_tokens = len(labels), model.config.block_size
    use_cfg = cfg_scale > 1.0
    rows = 2 * b if use_cfg else b
    model.setup_caches(max_batch_size=rows, device=labels.device)
    tokens = torch.empty(b, n_tokens, dtype=torch.long, device=labels.device)

    def pick(logits: torch.Tensor, t: int) -> torch.Tensor:
        if use_cfg:
            logits = guided(logits, cfg_scale) if cfg_interval < 0 or t <= cfg_interval else logits[:b]
        return sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    cond = with_null_class(labels, model.config.null_class) if use_cfg else labels
    tokens[:, 0] = pick(model.prefill(cond), 0)
    input_pos = torch.ones(1, dtype=torch.long, device=labels.device)
    # On the CPU each step attends to the filled part of the cache only (the compiled step becomes ~12% faster
    # at batch 64 with CFG); on GPUs to the whole masked cache, so that every shape is fixed (CUDA graphs).
    prefix_only = labels.device.type == "cpu"
    for t in range(1, n_tokens):
        previous = tokens[:, t - 1]
        logits = model.decode_step(previous.repeat(2) if use_cfg else previous, input_pos,
                                   kv_len=t + 1 if prefix_only else None)
        tokens[:, t] = pick(logits, t)
        input_pos += 1
    model.clear_caches()
    return tokens


@torch.no_grad()
def generate_uncached(model: GPT, labels: torch.Tensor, *, cfg_scale: float = 1.0) -> torch.Tensor:
    """Greedy decoding by re-running the full sequence every step: the reference for `generate`."""
    b = len(labels)
    use_cfg = cfg_scale > 1.0
    cond = with_null_class(labels, model.config.null_class) if use_cfg else labels
    tokens = torch.zeros(b, 0, dtype=torch.long, device=labels.device)
    for _t in range(model.config.block_size):
        seq = torch.cat([tokens, tokens.new_zeros(b, 1)], dim=1)  # the last token is never read
        logits, _ = model(seq.repeat(2, 1) if use_cfg else seq, cond)
        logits = logits[:, -1]
        tokens = torch.cat([tokens, (guided(logits, cfg_scale) if use_cfg else logits).argmax(-1, keepdim=True)], 1)
    return tokens


@torch.no_grad()
def refine(refiner: Refiner, coarse: torch.Tensor, labels: torch.Tensor, coarse_of_fine: torch.Tensor, *,
           temperature: float = 1.0, top_k: int = 0, cfg_scale: float = 1.0, restrict: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Stage 2: all fine tokens [B, T] from the coarse grid [B, T] in one forward pass. With
    `restrict`, each position samples only among the codewords of its cluster."""
    use_cfg = cfg_scale > 1.0
    rows = (coarse.repeat(2, 1), with_null_class(labels, refiner.config.null_class)) if use_cfg else (coarse, labels)
    if not restrict:
        logits, _ = refiner(*rows)
        return sample_tokens(guided(logits, cfg_scale) if use_cfg else logits, temperature=temperature, top_k=top_k,
                             generator=generator)
    hidden = refiner.hidden(*rows)
    # The head is linear without bias, so guiding the hidden states guides the logits.
    hidden = guided(hidden, cfg_scale) if use_cfg else hidden
    return sample_within_clusters(hidden, coarse, refiner.output.weight, coarse_of_fine.to(coarse.device),
                                  temperature=temperature, top_k=top_k, generator=generator)


def sample_within_clusters(hidden: torch.Tensor, coarse: torch.Tensor, head: torch.Tensor, coarse_of_fine: torch.Tensor,
                           *, temperature: float = 1.0, top_k: int = 0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Fine tokens [B, T]: at each position, sampled from the softmax over its cluster's members of
    `hidden @ head.T`. Only the members' logits are computed (cluster by cluster), not all V of them:
    a cluster holds V / K codewords on average."""
    flat_hidden, flat_coarse = hidden.flatten(0, 1), coarse.flatten()
    members = torch.argsort(coarse_of_fine, stable=True)  # fine ids grouped by cluster
    bounds = torch.cumsum(torch.bincount(coarse_of_fine, minlength=int(coarse_of_fine.max()) + 1), 0).tolist()
    order = torch.argsort(flat_coarse, stable=True)  # positions grouped by cluster
    clusters, counts = torch.unique_consecutive(flat_coarse[order], return_counts=True)
    fine = torch.empty_like(flat_coarse)
    for cluster, positions in zip(clusters.tolist(), order.split(counts.tolist())):
        ids = members[(bounds[cluster - 1] if cluster else 0):bounds[cluster]]
        logits = (flat_hidden[positions] @ head[ids].T).float()
        fine[positions] = ids[sample_tokens(logits, temperature=temperature, top_k=top_k, generator=generator)]
    return fine.view_as(coarse)
