"""Reference implementations the tests compare the library's fast paths against: plain and slow, used by nothing
in src/."""

import torch

from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner
from ctfgen.sampling.decode import guided, sample_tokens, with_null_class
from ctfgen.sampling.params import SamplingParams


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


def sample_within_clusters_loop(refiner: Refiner, hidden: torch.Tensor, coarse: torch.Tensor,
                                coarse_of_fine: torch.Tensor, params: SamplingParams,
                                uniforms: torch.Tensor) -> torch.Tensor:
    """`sample_within_clusters` cluster by cluster in a Python loop (what it replaced)."""
    flat_hidden, flat_coarse, flat_uniforms = hidden.flatten(0, 1), coarse.flatten(), uniforms.flatten()
    members = torch.argsort(coarse_of_fine, stable=True)  # fine ids grouped by cluster
    bounds = torch.cumsum(torch.bincount(coarse_of_fine, minlength=int(coarse_of_fine.max()) + 1), 0).tolist()
    order = torch.argsort(flat_coarse, stable=True)  # positions grouped by cluster
    clusters, counts = torch.unique_consecutive(flat_coarse[order], return_counts=True)
    fine = torch.empty_like(flat_coarse)
    for cluster, positions in zip(clusters.tolist(), order.split(counts.tolist())):
        ids = members[(bounds[cluster - 1] if cluster else 0):bounds[cluster]]
        logits = refiner.member_logits(flat_hidden[positions], ids)
        fine[positions] = ids[sample_tokens(logits, params, flat_uniforms[positions])]
    return fine.view_as(coarse)
