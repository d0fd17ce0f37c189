"""Which history predicts the next coarse label better: the coarse labels before it (stage 1), or the fine tokens
before it (the baseline, its distribution over fine tokens summed within each cluster)? And the likelihood of the
fine tokens under each model, split into its coarse and within-cluster parts.

    python experiments/coarse_nll.py --pipeline runs/kconv/pipe_k512 --codes runs/codes/test --n 2000

On the first `--n` grids of `--codes` (the held-out ones), teacher-forced, conditional on the true class: the
mean negative log-likelihood (nats per token) and top-1 accuracy of each position's true coarse label under
stage 1, and under the baseline with its fine probabilities summed over the members of each cluster. Both models
see the same class and the same earlier positions, one as coarse labels, one as fine tokens: the difference is
what the coarse history loses.

Since a fine token determines its coarse label, each model's NLL of the fine tokens is its coarse NLL plus a
within-cluster NLL (the true token among its cluster's members): for CTF, stage 2's (given the whole true coarse
grid, every position on its own, renormalised within the cluster as the sampler does); for the baseline, its fine
NLL less its coarse NLL (given the fine tokens before). `ctf_fine_nll` against `baseline_fine_nll` compares the
two models as likelihoods of the same data, part by part. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from ctfgen.data.codes import CodeDataset
from ctfgen.models.gpt import GPT
from ctfgen.pipeline import CTFPipeline


def coarse_nll(log_probs: torch.Tensor, coarse: torch.Tensor) -> tuple[float, float]:
    """Summed NLL and correct count of the true coarse labels [B, T] under log-probabilities [B, T, K]."""
    nll = -log_probs.gather(-1, coarse[..., None]).sum()
    return float(nll), int((log_probs.argmax(-1) == coarse).sum())


def cluster_log_probs(fine_log_probs: torch.Tensor, cluster_of: torch.Tensor, k: int) -> torch.Tensor:
    """Log-probabilities [B, T, K] of the clusters: the fine probabilities [B, T, V] summed over each one's members."""
    mass = fine_log_probs.new_zeros(*fine_log_probs.shape[:2], k).index_add_(-1, cluster_of, fine_log_probs.exp())
    return mass.clamp_min(1e-30).log()


def within_cluster_nll(fine_log_probs: torch.Tensor, clusters: torch.Tensor, fine: torch.Tensor,
                       coarse: torch.Tensor) -> float:
    """Summed NLL of the true fine tokens [B, T] among their own cluster's members (renormalised within it), from the
    fine log-probabilities [B, T, V] and the clusters' (`cluster_log_probs`) [B, T, K]."""
    own = fine_log_probs.gather(-1, fine[..., None])[..., 0]
    return float(-(own - clusters.gather(-1, coarse[..., None])[..., 0]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline with CTF stages and a baseline")
    parser.add_argument("--baseline", help="a baseline GPT checkpoint instead of the pipeline's (e.g. for a pipeline "
                                           "fitted with --no-baseline)")
    parser.add_argument("--codes", default="runs/codes/test")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()
    pipe = CTFPipeline.from_pretrained(args.pipeline).copy(torch.float32)
    baseline = GPT.from_pretrained(args.baseline).float() if args.baseline else pipe.baseline
    codes = CodeDataset(args.codes)
    cluster_of = pipe.coarse_map.coarse_of_fine  # [V]: each fine token's cluster
    k = pipe.coarse_map.k
    totals = {"stage1": [0.0, 0], "baseline": [0.0, 0]}
    within = {"stage2": 0.0, "baseline": 0.0}
    tokens = 0
    with torch.no_grad():
        for index in torch.arange(min(args.n, len(codes))).split(args.batch):
            fine = codes.grids(index.numpy())[:, 0].flatten(1)  # the first view: the image itself
            labels = codes.labels[index]
            coarse = cluster_of[fine]
            stage1_logits, _ = pipe.stage1(coarse, labels)
            baseline_fine = baseline(fine, labels)[0].log_softmax(-1)
            baseline_clusters = cluster_log_probs(baseline_fine, cluster_of, k)
            for name, log_probs in (("stage1", stage1_logits.log_softmax(-1)), ("baseline", baseline_clusters)):
                nll, correct = coarse_nll(log_probs, coarse)
                totals[name][0] += nll
                totals[name][1] += correct
            within["baseline"] += within_cluster_nll(baseline_fine, baseline_clusters, fine, coarse)
            stage2_fine = pipe.stage2(coarse, labels)[0].log_softmax(-1)
            within["stage2"] += within_cluster_nll(stage2_fine, cluster_log_probs(stage2_fine, cluster_of, k), fine,
                                                   coarse)
            tokens += coarse.numel()
    mean = {f"{name}_coarse_nll": nll / tokens for name, (nll, _) in totals.items()}
    mean |= {f"{name}_within_nll": nll / tokens for name, nll in within.items()}
    mean["ctf_fine_nll"] = mean["stage1_coarse_nll"] + mean["stage2_within_nll"]
    mean["baseline_fine_nll"] = mean["baseline_coarse_nll"] + mean["baseline_within_nll"]
    print(json.dumps({"pipeline": args.pipeline, "baseline": args.baseline or f"{args.pipeline}/baseline", "k": k,
                      "tokens": tokens, **{name: round(value, 4) for name, value in mean.items()},
                      **{f"{name}_coarse_accuracy": round(c / tokens, 4) for name, (_, c) in totals.items()}},
                     indent=2))


if __name__ == "__main__":
    main()
