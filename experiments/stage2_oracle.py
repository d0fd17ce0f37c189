"""Where CTF's FID comes from: stage 2 alone, on the true coarse grids of real images.

    python experiments/stage2_oracle.py --pipeline pretrained/fmnist --codes runs/codes/train --n 2000

Takes the token grids of `--n` real images (a fixed random subset of `--codes`), and scores with `ctfgen eval`'s
metrics against the test split: (1) their reconstructions by the tokenizer (the floor at this n), (2) the images
stage 2 makes from their true coarse labels (stage 1 replaced by an oracle), at each `--stage2-temperatures`,
(3) the images decoded from the coarse labels alone (cluster-mean codewords). If (2) is far above (1), stage 2
is what holds CTF back, whatever stage 1 does. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ctfgen.checkpoint import DTYPES
from ctfgen.data.codes import CodeDataset
from ctfgen.evaluation import evaluate_images, load_feature_network
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import SamplingParams

METRICS = ("fid", "inception_score", "precision", "recall", "accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist")
    parser.add_argument("--codes", default="runs/codes/train")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--stage2-temperatures", default="1.0,0.5,0")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = CTFPipeline.from_pretrained(args.pipeline).copy(DTYPES[args.dtype])
    codes = CodeDataset(args.codes)
    index = np.sort(np.random.default_rng(args.seed).permutation(len(codes))[:args.n])
    fine = codes.grids(index)[:, 0]  # the first view: the image itself
    labels = codes.labels[torch.as_tensor(index)].numpy()
    coarse = pipe.coarse_map.coarse_of_fine[fine]
    network = load_feature_network("fmnist")

    def score(pixels: torch.Tensor) -> dict:
        result = evaluate_images(pixels.permute(0, 2, 3, 1).numpy(), labels, "fmnist-test", network)
        return {key: result[key] for key in METRICS}

    with torch.no_grad():
        results = {"n": args.n, "reconstruction": score(torch.cat([pipe.decode(f) for f in fine.split(250)])),
                   "coarse_only": score(torch.cat([pipe.decode_preview(c) for c in coarse.split(250)]))}
        for temperature in (float(t) for t in args.stage2_temperatures.split(",")):
            out = pipe.variations(coarse, labels.tolist(), stage2_sampling=SamplingParams(temperature=temperature),
                                  seed=args.seed, batch_size=250, output_type="pt")
            results[f"stage2_oracle_t{temperature:g}"] = score(out.images)
            print(json.dumps({f"stage2_oracle_t{temperature:g}": results[f"stage2_oracle_t{temperature:g}"]}),
                  flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
