"""Do a position's neighbours tell stage 2 anything the coarse grid does not? Held-out loss with a share revealed.

    python experiments/reveal_loss.py --refiner runs/reveal/k128/checkpoint \
        --map pretrained/fmnist/coarse_map_k128.safetensors --codes runs/codes/test \
        --out docs/results/reveal_loss_k128.json

Scores the fine token of every hidden position of `--n` held-out grids under a refiner trained with `--reveal`,
with a fixed random share of each grid's true fine tokens revealed (0: nothing, the one-step refiner's setting),
in nats per token: over all V tokens, and within the position's cluster (the softmax over its cluster's
members: what the sampler draws from). If revealing half lowers the within-cluster loss, neighbours carry
information that S-step sampling can use. Writes (and prints) JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctfgen.clustering import CoarseMap
from ctfgen.data.codes import CodeDataset
from ctfgen.files import write_atomic
from ctfgen.models.refiner import Refiner


def reveal_mask(shape, share: float, seed: int) -> torch.Tensor:
    """Exactly round(share * T) revealed positions per grid, chosen at random (fixed by seed)."""
    batch, n = shape
    rank = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)).argsort(1).argsort(1)
    return rank < round(share * n)


@torch.no_grad()
def losses(refiner: Refiner, coarse_of_fine: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor,
           labels: torch.Tensor, share: float, seed: int, batch_size: int = 500) -> dict:
    """Mean negative log-likelihood of the hidden positions' true fine tokens, over all tokens and within clusters."""
    revealed = reveal_mask(fine.shape, share, seed)
    total_full = total_cluster = count = 0.0
    in_cluster = coarse_of_fine[None, None, :]  # [1, 1, V]
    for start in range(0, len(fine), batch_size):
        f, c, lab, r = (t[start:start + batch_size] for t in (fine, coarse, labels, revealed))
        inputs = torch.where(r, f, refiner.hidden_token) if refiner.fine_embeddings is not None else None
        logits = refiner(c, lab, fine=inputs)[0].double()  # [b, T, V]
        target = f.unsqueeze(-1)
        full = -logits.log_softmax(-1).gather(-1, target).squeeze(-1)
        within = -logits.masked_fill(in_cluster != c.unsqueeze(-1), float("-inf")).log_softmax(-1)
        within = within.gather(-1, target).squeeze(-1)
        hidden = ~r
        total_full += full[hidden].sum().item()
        total_cluster += within[hidden].sum().item()
        count += hidden.sum().item()
    return {"share_revealed": share, "nll": total_full / count, "nll_within_cluster": total_cluster / count,
            "positions_scored": int(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refiner", required=True, help="refiner checkpoint (trained with --reveal, or not: share 0)")
    parser.add_argument("--map", required=True, help="its coarse map")
    parser.add_argument("--codes", default="runs/codes/test", help="held-out codes")
    parser.add_argument("--n", type=int, default=2000, help="held-out grids (the first n)")
    parser.add_argument("--shares", default="0,0.25,0.5,0.75", help="shares of each grid revealed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    refiner = Refiner.from_pretrained(args.refiner)
    coarse_map = CoarseMap.load(args.map)
    codes = CodeDataset(args.codes)
    index = np.arange(min(args.n, len(codes)))
    fine = codes.grids(index)[:, 0].flatten(1)
    labels = codes.labels[torch.as_tensor(index)]
    coarse = coarse_map.coarse_of_fine[fine]
    shares = [float(s) for s in args.shares.split(",")] if refiner.fine_embeddings is not None else [0.0]
    result = {"refiner": args.refiner, "map": args.map, "k": coarse_map.k, "codes": args.codes, "n": len(index),
              "rows": [losses(refiner, coarse_map.coarse_of_fine, fine, coarse, labels, s, args.seed) for s in shares]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))


if __name__ == "__main__":
    main()
