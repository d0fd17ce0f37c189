"""Where a decode step's time goes: torch.profiler over the cached decode step of a pipeline's stage 1 (or baseline).

    python benchmarks/decode_profile.py --pipeline pretrained/fmnist --batch 64 --top 15
    python benchmarks/decode_profile.py --pipeline pretrained/fmnist --batch 64 --compile
    CTFGEN_DECODE_BACKEND=eager python benchmarks/decode_profile.py --pipeline pretrained/fmnist --batch 64
    python benchmarks/decode_profile.py --threads 1 --label after_eager --out docs/results/decode_profile.json

The step is the one `ctfgen bench` times (`ctfgen.bench.mid_sequence_step`): the sampler's decode backend, at the middle
of the grid, 2 x batch rows (CFG), in the precision `--precision` resolves to (auto: bf16 on CPUs with native bf16),
compiled with --compile (the warm-up pays the compile time). Prints JSON: the step's median ms over --steps unprofiled
steps, then the --top operators with the most CPU time of their own over --steps profiled ones (ms per step, share of
all operators' time); with --out, also into that JSON file under --label (the file's other labels kept).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ctfgen.backends.precision import PRECISIONS, resolve_dtype
from ctfgen.bench import cpu_description, median_seconds, mid_sequence_step, top_operators
from ctfgen.files import write_atomic
from ctfgen.pipeline import CTFPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist")
    parser.add_argument("--model", choices=("stage1", "baseline"), default="stage1")
    parser.add_argument("--batch", type=int, default=64, help="images; the step has 2 x batch rows (CFG)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--label", help="the key the profile is stored under in --out")
    parser.add_argument("--out", type=Path, help="a JSON file to store the profile in, under --label")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = CTFPipeline.from_pretrained(args.pipeline)
    precision, dtype = resolve_dtype(args.precision, pipe.device)
    pipe = pipe.copy(dtype)
    if args.compile:
        pipe.compile_decoding()
    model = getattr(pipe, args.model)
    with torch.no_grad(), mid_sequence_step(model, 2 * args.batch, dtype) as (step, decoder, kv_len):
        seconds = median_seconds(step, repeats=args.steps, warmup=3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(args.steps):
                step()
    profile = {"model": args.model, "batch": args.batch, "rows": 2 * args.batch, "kv_len": kv_len,
               "precision": precision, "compiled": args.compile, "decoder": type(decoder).__name__,
               "threads": torch.get_num_threads(), "cpu": cpu_description(), "load_average": os.getloadavg()[0],
               "step_ms": seconds * 1e3, "top_operators": top_operators(profiler, args.top, args.steps)}
    print(json.dumps(profile, indent=1))
    if args.out:
        stored = json.loads(args.out.read_text()) if args.out.exists() else {}
        stored[args.label or "profile"] = profile
        write_atomic(args.out, lambda tmp: Path(tmp).write_text(json.dumps(stored, indent=1) + "\n"))


if __name__ == "__main__":
    main()
