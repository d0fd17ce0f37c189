"""Training throughput of a transformer stage in fp32 and under bf16 autocast, in one run.

    python benchmarks/train_throughput.py --model GPT-S --vocab 4096 --batch 64 --steps 10

Prints JSON: tokens/s (median over timed steps, after warm-up) for each precision and the ratio.
Synthetic tokens: the speed of a step does not depend on the data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ctfgen.models.gpt import GPT, gpt_config
from ctfgen.precision import autocast_context, cpu_has_fast_bf16
from ctfgen.train import param_groups


def tokens_per_second(model: GPT, precision: str, batch: int, steps: int, warmup: int = 2) -> float:
    cfg = model.config
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        tokens = torch.randint(cfg.vocab_size, (batch, cfg.block_size), generator=generator)
        labels = torch.randint(cfg.num_classes, (batch,), generator=generator)
        tic = time.perf_counter()
        with autocast_context(precision, torch.device("cpu")):
            _, loss = model(tokens, labels, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return batch * cfg.block_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GPT-S")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    result = {"model": args.model, "vocab": args.vocab, "batch": args.batch, "block_size": args.block_size,
              "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_has_fast_bf16": cpu_has_fast_bf16()}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = GPT(gpt_config(args.model, vocab_size=args.vocab, block_size=args.block_size, num_classes=10)).train()
        result[f"{precision}_tokens_per_s"] = round(tokens_per_second(model, precision, args.batch, args.steps))
    result["bf16_speedup"] = round(result["bf16_tokens_per_s"] / result["fp32_tokens_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
