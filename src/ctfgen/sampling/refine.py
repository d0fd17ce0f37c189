"""Stage 2: the fine tokens of a whole coarse grid, in one pass (the paper) or in S steps (MaskGIT-style).

One pass: every position's fine token is sampled at once from the refiner's logits given the class and the coarse
grid, among the codewords of its cluster. In S steps (a refiner trained with `--reveal`): each step samples every
position still hidden, keeps the most confident share given by the cosine schedule (after step s,
floor(T cos(pi/2 (s+1)/S)) positions stay hidden; none after the last) and feeds the kept tokens back, so later
tokens see their neighbours. S = 1 is the one-pass refiner, number for number.
"""

from __future__ import annotations

import math

import torch

from ctfgen.models.refiner import Refiner
from ctfgen.sampling.decode import fresh_uniforms, guided, sample_tokens, with_null_class
from ctfgen.sampling.params import SamplingParams


def hidden_after_step(step: int, steps: int, n_tokens: int) -> int:
    """How many of n_tokens positions stay hidden after step `step` (from 0) of `steps`: 0 after the last."""
    return math.floor(n_tokens * math.cos(math.pi / 2 * (step + 1) / steps) + 1e-9) if step + 1 < steps else 0


@torch.no_grad()
def refine(refiner: Refiner, coarse: torch.Tensor, labels: torch.Tensor, coarse_of_fine: torch.Tensor,
           params: SamplingParams = SamplingParams(), *, steps: int = 1, restrict: bool = True,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Fine tokens [B, T] from the coarse grid [B, T] in `steps` passes; step s picks the token at position t by
    uniforms[b, s, t] (uniforms [B, steps, T]; [B, T] for one step; None: fresh ones). With `restrict`, each
    position samples only among the codewords of its cluster (top-k / top-p among those)."""
    if steps > 1 and refiner.fine_embeddings is None:
        raise ValueError("sampling stage 2 in several steps needs a refiner trained with --reveal")
    uniforms = fresh_uniforms((coarse.shape[0], steps, coarse.shape[1]), coarse.device) if uniforms is None \
        else uniforms.to(coarse.device).view(coarse.shape[0], steps, coarse.shape[1])
    coarse_of_fine = coarse_of_fine.to(coarse.device)
    fine = None if steps == 1 else torch.full_like(coarse, refiner.hidden_token)
    for step in range(steps):
        picked, log_prob = sample_pass(refiner, coarse, labels, fine, coarse_of_fine, params, restrict,
                                       uniforms[:, step], confidence=fine is not None)
        if fine is None:
            return picked
        hidden = fine == refiner.hidden_token
        # The least confident of the positions sampled this step go back to hidden; revealed ones never do.
        confidence = log_prob.masked_fill(~hidden, float("inf"))
        stays_hidden = confidence.argsort(1).argsort(1) < hidden_after_step(step, steps, coarse.shape[1])
        fine = torch.where(hidden & ~stays_hidden, picked, fine)
    return fine


def sample_pass(refiner: Refiner, coarse: torch.Tensor, labels: torch.Tensor, fine: torch.Tensor | None,
                coarse_of_fine: torch.Tensor, params: SamplingParams, restrict: bool, uniforms: torch.Tensor,
                confidence: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One refiner pass given the revealed tokens `fine` (None: a refiner that reads none): a sampled token at
    every position [B, T] and, with `confidence`, its log-probability under the (guided) distribution it was
    sampled from (else None)."""
    use_cfg = params.guided
    rows = (coarse, labels, fine)
    if use_cfg:
        rows = (coarse.repeat(2, 1), with_null_class(labels, refiner.config.null_class),
                None if fine is None else fine.repeat(2, 1))
    hidden = refiner.hidden(*rows)
    # The head is linear without bias, so guiding the hidden states guides the logits.
    hidden = guided(hidden, params.cfg_scale) if use_cfg else hidden
    if not restrict:
        return pick(refiner.output(hidden).float(), params, uniforms, confidence)
    return sample_within_clusters(refiner, hidden, coarse, coarse_of_fine, params, uniforms, confidence)


def pick(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor,
         confidence: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample_tokens, and with `confidence` the log-probability of each pick under the tempered logits (the raw ones
    at T = 0; else None: the one-pass refiner has no use for it)."""
    picked = sample_tokens(logits, params, uniforms)
    if not confidence:
        return picked, None
    scaled = logits.float() / params.temperature if params.temperature > 0 else logits.float()
    return picked, scaled.log_softmax(-1).gather(-1, picked.unsqueeze(-1)).squeeze(-1)


def sample_within_clusters(refiner: Refiner, hidden: torch.Tensor, coarse: torch.Tensor, coarse_of_fine: torch.Tensor,
                           params: SamplingParams, uniforms: torch.Tensor, confidence: bool = False,
                           chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fine tokens [B, T] (and with `confidence` their log-probabilities): at each position, sampled (by its number
    in uniforms [B, T]) from the softmax over its cluster's members of the refiner's logits at `hidden` [B, T, dim].
    Only the members' logits are computed, not all V of them (a cluster holds V / K codewords on average), and all
    at once: the positions, grouped by cluster into chunks of up to `chunk` positions, meet their cluster's rows of
    the output layer in one batched matmul; clusters are padded to the largest one, and the padding masked out of
    one batched sampling call."""
    flat_hidden, flat_coarse, flat_uniforms = hidden.flatten(0, 1), coarse.flatten(), uniforms.flatten()
    table, sizes = member_table(coarse_of_fine)  # [K, M] fine ids of each cluster, padded; [K] cluster sizes
    k, n = len(sizes), len(flat_coarse)
    order = torch.argsort(flat_coarse, stable=True)  # positions grouped by cluster
    clusters = flat_coarse[order]
    counts = torch.bincount(flat_coarse, minlength=k)
    chunks = (counts + chunk - 1) // chunk  # per cluster
    rank = torch.arange(n, device=coarse.device) - (torch.cumsum(counts, 0) - counts)[clusters]  # within its cluster
    rows = (torch.cumsum(chunks, 0) - chunks)[clusters] * chunk + rank  # each position's row among the chunks' rows
    n_chunks = int(chunks.sum())
    grouped = flat_hidden.new_zeros(n_chunks * chunk, flat_hidden.shape[-1])
    grouped.index_copy_(0, rows, flat_hidden.index_select(0, order))
    chunk_ids = table[torch.repeat_interleave(torch.arange(k, device=coarse.device), chunks)]  # [chunks, M]
    logits = refiner.member_logits(grouped.view(n_chunks, chunk, -1), chunk_ids).flatten(0, 1).index_select(0, rows)
    padding = torch.arange(table.shape[1], device=coarse.device) >= sizes[clusters, None]
    picked, log_prob = pick(logits.masked_fill(padding, float("-inf")), params, flat_uniforms[order], confidence)
    fine = torch.empty_like(flat_coarse)
    fine[order] = table[clusters, picked]
    if log_prob is None:
        return fine.view_as(coarse), None
    fine_log_prob = torch.empty_like(log_prob)
    fine_log_prob[order] = log_prob
    return fine.view_as(coarse), fine_log_prob.view_as(coarse)


def member_table(coarse_of_fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine ids of each cluster in increasing order, [K, M] padded with 0 to the largest cluster's size M, and
    the clusters' sizes [K]."""
    sizes = torch.bincount(coarse_of_fine)
    members = torch.argsort(coarse_of_fine, stable=True)  # fine ids grouped by cluster
    rank = torch.arange(len(members), device=members.device) - (torch.cumsum(sizes, 0) - sizes)[coarse_of_fine[members]]
    table = members.new_zeros(len(sizes), int(sizes.max()))
    table[coarse_of_fine[members], rank] = members
    return table, sizes
