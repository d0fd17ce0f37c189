"""The tokenizer's nearest-codeword search at growing codebook sizes: all distances at once against in chunks.

    python benchmarks/quantizer.py --out docs/results/quantizer_speed.json

For VQ-fmnist with V = 1,024, 4,096 and 16,384 codewords, on a training step's latents (64 images of 32 x 32: 4,096
latents of dimension 8), times

- the search alone: the [latents, V] distance matrix at once, as the quantizer computed it before, against
  `ctfgen.tokenizer.model.nearest_codewords` (64 latents at a time, so the distances stay in the CPU's caches);
- a whole training step of the tokenizer (forward, losses, backward, AdamW), with each of the two searches.

The two versions alternate call by call (`interleaved_median_seconds`), and both find the same codewords (checked).
Prints JSON (and writes it with --out): per V the milliseconds of each and their ratio. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import ctfgen.tokenizer.model as vq
from ctfgen.bench import cpu_description, interleaved_median_seconds
from ctfgen.files import write_atomic
from ctfgen.tokenizer.config import VQ_PRESETS

CHUNKED = vq.nearest_codewords


def all_at_once(latents: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """The search as the quantizer did it before: every distance in one [latents, V] matrix."""
    return vq.codeword_distances(latents, codewords).argmin(1)


def training_step(model: vq.VQModel, optimizer: torch.optim.Optimizer, images: torch.Tensor):
    def step() -> None:
        out = model(images)
        loss = F.mse_loss(out.reconstruction, images) + out.quant.codebook_loss + out.quant.commit_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def with_search(search, fn):
    """`fn` with the quantizer's search swapped for `search`."""
    def run() -> None:
        vq.nearest_codewords = search
        try:
            fn()
        finally:
            vq.nearest_codewords = CHUNKED
    return run


def figures(vocab: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = vq.VQModel(replace(VQ_PRESETS["VQ-fmnist"], codebook_size=vocab)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 32, 32) * 2 - 1  # Fashion-MNIST is fed as 3 channels, padded to 32 x 32
    with torch.no_grad():
        latents = F.normalize(model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1), dim=-1)
        latents = latents.reshape(-1, model.config.codebook_embed_dim).contiguous()
    codewords = model.quantize.codewords().detach()
    same = torch.equal(all_at_once(latents, codewords), CHUNKED(latents, codewords))
    search = interleaved_median_seconds({"all_at_once": lambda: all_at_once(latents, codewords),
                                         "chunked": lambda: CHUNKED(latents, codewords)}, repeats, warmup=2)
    step = training_step(model, optimizer, images)
    steps = interleaved_median_seconds({"all_at_once": with_search(all_at_once, step),
                                        "chunked": with_search(CHUNKED, step)}, repeats, warmup=2)
    ms = {name: {key: round(seconds * 1e3, 2) for key, seconds in timed.items()}
          for name, timed in (("search_ms", search), ("training_step_ms", steps))}
    return {"vocab_size": vocab, "latents": latents.shape[0], "same_codewords": same, **ms,
            "search_speedup": search["all_at_once"] / search["chunked"],
            "training_step_speedup": steps["all_at_once"] / steps["chunked"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="1024,4096,16384")
    parser.add_argument("--batch", type=int, default=64, help="images per training step")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = {"command": "python " + " ".join(sys.argv), "cpu": cpu_description(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
              "rows": [figures(int(v), args.batch, args.repeats) for v in args.vocabs.split(",")]}
    text = json.dumps(result, indent=1)
    if args.out:
        write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
