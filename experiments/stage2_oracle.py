"""Where CTF's FID comes from: stage 2 alone, on the true coarse grids of real images.

    python experiments/stage2_oracle.py --pipeline pretrained/fmnist --codes runs/codes/train --n 2000

Takes the token grids of `--n` real images (a fixed random subset of `--codes`), and scores with `ctfgen eval`'s
metrics against the test split: (1) their reconstructions by the tokenizer (the floor at this n), (2) the images
stage 2 makes from their true coarse labels (stage 1 replaced by an oracle), at each `--stage2-temperatures`,
(3) the images decoded from the coarse labels alone (cluster-mean codewords). If (2) is far above (1), stage 2
is what holds CTF back, whatever stage 1 does. `--refiner` and `--map` measure another stage 2 (e.g. one trained
with `--reveal`, at `--stage2-steps` passes) with the pipeline's tokenizer. Prints JSON (and writes it to --out).

    python experiments/stage2_oracle.py --refiner runs/reveal/k512/checkpoint \
        --map runs/maps/coarse_map_k512.safetensors --stage2-temperatures 1 --stage2-steps 1,2,4,8 \
        --out docs/results/stage2_steps_oracle_k512.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctfgen.checkpoint import DTYPES
from ctfgen.clustering import CoarseMap
from ctfgen.data.codes import CodeDataset
from ctfgen.evaluation import evaluate_images, load_feature_network
from ctfgen.files import write_atomic
from ctfgen.models.refiner import Refiner
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
    parser.add_argument("--refiner", help="a stage-2 checkpoint to measure instead of the pipeline's (with --map)")
    parser.add_argument("--map", help="the coarse map of --refiner")
    parser.add_argument("--stage2-steps", default="1", help="stage-2 passes to measure, comma-separated")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    if bool(args.refiner) != bool(args.map):
        parser.error("--refiner and --map go together")
    pipe = CTFPipeline.from_pretrained(args.pipeline).copy(DTYPES[args.dtype])
    if args.refiner:  # only stage 2, the map and the tokenizer are used here (stage 1 is the oracle), so the
        # pipeline's stage 1 may have another K than this map: the parts are swapped in after the pipeline's checks
        pipe.stage2 = Refiner.from_pretrained(args.refiner).to(DTYPES[args.dtype])
        pipe.coarse_map = CoarseMap.load(args.map)
        pipe.coarse_map.check_fingerprint(pipe.tokenizer.fingerprint, pipe.tokenizer.config.codebook_size)
        if pipe.stage2.config.coarse_vocab_size != pipe.coarse_map.k:  # the one check of the pair left to do here
            parser.error(f"--refiner reads {pipe.stage2.config.coarse_vocab_size} coarse labels; --map has "
                         f"{pipe.coarse_map.k}: give the map it was trained with")
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
            for steps in (int(s) for s in args.stage2_steps.split(",")):
                params = SamplingParams(temperature=temperature, steps=steps)
                start = time.perf_counter()
                out = pipe.variations(coarse, labels.tolist(), stage2_sampling=params, seed=args.seed,
                                      batch_size=250, output_type="pt")
                seconds = time.perf_counter() - start  # stage 2 and decoding, not the scoring
                name = f"stage2_oracle_t{temperature:g}" + (f"_s{steps}" if steps > 1 else "")
                results[name] = score(out.images) | {"steps": steps, "seconds": seconds}
                print(json.dumps({name: results[name]}), flush=True)
    text = json.dumps(results | {"pipeline": args.pipeline, "refiner": args.refiner or f"{args.pipeline}/stage2",
                                 "k": pipe.coarse_map.k, "dtype": args.dtype}, indent=2)
    print(text)
    if args.out:
        write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))


if __name__ == "__main__":
    main()
