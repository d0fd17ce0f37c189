"""Training throughput of every transformer stage, fp32 and bf16, eager and compiled, in one run.

    python benchmarks/train_throughput.py   # the shipped shapes: GPT-S baseline and stage 1, GPT-XS stage 2
    python benchmarks/train_throughput.py --stages baseline --precisions bf16 --variants compiled --steps 20
    python benchmarks/train_throughput.py --stages baseline --precisions bf16 --variants eager --profile 8

Times `ctfgen.training.train.train_step` (the training loop's own step: forward, backward, clip, fused AdamW) on
models built by `ctfgen.training.train.build_model`, so the figures are those of `ctfgen train`. Prints JSON: per
stage, precision and variant the tokens/s (median over timed steps after warm-up), the achieved GFLOP/s
(6 x matmul weights + 12 x layers x positions x dim per token, as PaLM counts) and that as a fraction of
the matmul peak of the same precision, measured in the same run (1024 x 1024 matmuls). Synthetic tokens:
a step's speed does not depend on the data. Run it on a quiet machine: it warns when the load is high.
`--profile N` adds, per configuration, the N operators that took the most CPU time of their own over the timed
steps (`torch.profiler`): where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from ctfgen.backends.precision import cpu_has_fast_bf16
from ctfgen.bench import matmul_peak_flops, top_operators
from ctfgen.training.train import STAGES, TrainConfig, build_model, param_groups, train_step

PRESETS = {"baseline": "GPT-S", "stage1": "GPT-S", "stage2": "GPT-XS"}  # the shipped Fashion-MNIST pipeline
VARIANTS = ("eager", "compiled")


def flops_per_token(model, block_size: int) -> float:
    cfg = model.config
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * matmul_weights + 12 * cfg.n_layer * block_size * cfg.dim


def tokens_per_second(stage: str, preset: str, precision: str, variant: str, data, batch: int, steps: int,
                      warmup: int, profile: int = 0) -> tuple[float, float, list[dict]]:
    cfg = TrainConfig(stage=stage, codes="", out="", model=preset, dropout=0.0, precision=precision,
                      compile=variant == "compiled")
    torch.manual_seed(0)
    model = build_model(cfg, data).train()
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, betas=(0.9, 0.95), fused=True)
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")

    def step():
        batch_tensors = (torch.randint(data.input_vocab, (batch, data.block_size), generator=generator),
                         torch.randint(data.num_classes, (batch,), generator=generator),
                         torch.randint(data.target_vocab, (batch, data.block_size), generator=generator))
        tic = time.perf_counter()
        train_step(train_model, model, optimizer, [batch_tensors], cfg, device)
        return time.perf_counter() - tic

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    top = []
    if profile:  # after the timed steps, so profiling does not slow them
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                step()
        top = top_operators(profiler, profile, steps)
    return batch * data.block_size / statistics.median(times), flops_per_token(model, data.block_size), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="eager, compiled (torch.compile)")
    parser.add_argument("--vocab", type=int, default=4096, help="fine vocabulary V")
    parser.add_argument("--k", type=int, default=128, help="coarse labels K")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also the N operators that take the most CPU time (torch.profiler)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f}: other work shares the cores, the figures will be low",
              file=sys.stderr)
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    result = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_has_fast_bf16": cpu_has_fast_bf16(), "load_average": round(load, 2), "batch": args.batch,
              "matmul_peak_gflops": {p: round(f / 1e9, 1) for p, f in peaks.items()}, "stages": {}}
    for stage in args.stages.split(","):
        data = SimpleNamespace(block_size=args.block_size, num_classes=10, fine_vocab=args.vocab,
                               input_vocab=args.vocab if stage == "baseline" else args.k,
                               target_vocab=args.k if stage == "stage1" else args.vocab)
        rows = result["stages"][stage] = {"model": PRESETS[stage]}
        for precision in args.precisions.split(","):
            for variant in args.variants.split(","):
                tokens, flops, top = tokens_per_second(stage, PRESETS[stage], precision, variant, data,
                                                       args.batch, args.steps, args.warmup, args.profile)
                rows[f"{precision}_{variant}"] = {
                    "tokens_per_s": round(tokens), "gflops": round(tokens * flops / 1e9, 1),
                    "fraction_of_peak": round(tokens * flops / peaks[precision], 3), **({"top": top} if top else {})}
                print(stage, precision, variant, rows[f"{precision}_{variant}"], file=sys.stderr)
        rows["mflop_per_token"] = round(flops / 1e6, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
