"""Stage-2 top-1 fine-token accuracy on held-out codes, given the true coarse labels, against
the trivial rule "always pick the cluster's most frequent member" (counted on the training codes).

    python experiments/stage2_accuracy.py --refiner runs/stage2/checkpoint --map MAP \
        --train-codes runs/codes/train --test-codes runs/codes/test
"""

from __future__ import annotations

import argparse
import json

import torch

from ctfgen.backends.precision import autocast_context
from ctfgen.clustering import CoarseMap
from ctfgen.data.codes import CodeDataset
from ctfgen.models.refiner import Refiner


def most_frequent_member(train: CodeDataset, coarse_map: CoarseMap) -> torch.Tensor:
    """For each cluster, its fine token seen most often in the training codes: [K]."""
    counts = torch.bincount(train.grids(range(len(train))).flatten(), minlength=coarse_map.vocab_size)
    best = torch.zeros(coarse_map.k, dtype=torch.long)
    for cluster, members in enumerate(coarse_map.members()):
        best[cluster] = members[counts[members].argmax()]
    return best


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refiner", required=True)
    parser.add_argument("--map", required=True)
    parser.add_argument("--train-codes", required=True)
    parser.add_argument("--test-codes", required=True)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    coarse_map = CoarseMap.load(args.map)
    train, test = CodeDataset(args.train_codes, coarse_map), CodeDataset(args.test_codes, coarse_map)
    refiner = Refiner.from_pretrained(args.refiner)
    rule = most_frequent_member(train, coarse_map)
    fine = test.grids(range(len(test)))[:, 0].flatten(1)  # view 0: the image itself
    coarse = coarse_map.coarse_of_fine[fine]
    correct_model = correct_rule = 0
    for start in range(0, len(fine), args.batch):
        f, c = fine[start:start + args.batch], coarse[start:start + args.batch]
        with autocast_context("auto", torch.device("cpu")):
            logits, _ = refiner(c, test.labels[start:start + args.batch])
        # restricted to the members of each position's cluster, as the sampler does
        allowed = coarse_map.coarse_of_fine[None, None, :] == c[..., None]
        prediction = logits.float().masked_fill(~allowed, float("-inf")).argmax(-1)
        correct_model += int((prediction == f).sum())
        correct_rule += int((rule[c] == f).sum())
    n = fine.numel()
    print(json.dumps({"n_tokens": n, "refiner_top1": correct_model / n, "most_frequent_member_top1": correct_rule / n,
                      "k": coarse_map.k, "vocab": coarse_map.vocab_size}, indent=2))


if __name__ == "__main__":
    main()
