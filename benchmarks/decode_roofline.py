"""The decode figures of `ctfgen bench` at several batch sizes, eager and compiled, into one JSON file.

    python benchmarks/decode_roofline.py --pipeline pretrained/fmnist --batches 1,16,64 --threads 1 \
        --label after --out docs/results/decode_roofline.json

Runs `ctfgen.bench.benchmark` (the bench's own measurement) for every batch size, eager and with the compiled decode
step, and keeps per run: images/s of CTF, its stage 1 and the baseline, and for the stage-1 and baseline decode steps
and the stage-2 pass their ms, FLOPs, bytes, fraction of the matmul peak and of the roofline, and the load average
before the run. The runs are stored under --label in --out, replacing that label's runs of the same batch size and
mode and keeping the rest: run it once per version of the code (e.g. with PYTHONPATH pointing at an older checkout),
alternating versions batch by batch on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ctfgen.bench import benchmark
from ctfgen.files import write_atomic
from ctfgen.pipeline import CTFPipeline

STEP_KEYS = ("decode_step_ms", "decode_step_flop_count", "decode_step_bytes", "decode_step_fraction_of_peak",
             "decode_step_fraction_of_shape_peak", "decode_step_read_bandwidth", "decode_step_roofline_ms",
             "decode_step_fraction_of_roofline")
STAGE2_KEYS = ("stage2_images_per_s", "stage2_flop_count", "stage2_bytes", "stage2_fraction_of_peak",
               "stage2_roofline_ms", "stage2_fraction_of_roofline")


def figures(result: dict, load_average: float) -> dict:
    """The decode figures of one bench result."""
    ctf, baseline = result["ctf"], result["baseline"]
    return {"batch": result["batch"], "compiled": result["compiled_decode_step"], "precision": result["precision"],
            "load_average": load_average,
            "ctf_images_per_s": ctf["images_per_s"], "stage1_images_per_s": ctf["stage1_images_per_s"],
            "baseline_images_per_s": baseline["images_per_s"],
            "baseline_gpt_images_per_s": baseline["gpt_images_per_s"],
            "stage1_step": {key: ctf[key] for key in STEP_KEYS},
            "baseline_step": {key: baseline[key] for key in STEP_KEYS},
            "stage2": {key: ctf[key] for key in STAGE2_KEYS},
            "matmul_peak_flops": result[f"{result['precision']}_matmul_peak_flops"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", required=True, help="the key the runs are stored under in --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    runs = []
    for batch in (int(b) for b in args.batches.split(",")):
        for compile in (False, True):
            load_average = os.getloadavg()[0]
            result = benchmark(pipe, batch=batch, repeats=args.repeats, compile=compile)
            runs.append(figures(result, load_average))
            print(json.dumps(runs[-1]), flush=True)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = [run for run in stored.get(args.label, {}).get("runs", [])
            if (run["batch"], run["compiled"]) not in {(new["batch"], new["compiled"]) for new in runs}]
    stored[args.label] = {"cpu": result["cpu"], "threads": result["threads"],
                          "runs": sorted(kept + runs, key=lambda run: (run["batch"], run["compiled"]))}
    write_atomic(args.out, lambda tmp: Path(tmp).write_text(json.dumps(stored, indent=1) + "\n"))


if __name__ == "__main__":
    main()
