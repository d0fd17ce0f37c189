"""Paper Table 1 in small: CTF against the baseline at convergence, three draws of 10,000 samples per model.

    python experiments/table1.py --pipeline pretrained/fmnist --ctf ctf_k512=runs/kconv/pipe_k512 \
        --out docs/results/table1_convergence.json

Each draw runs the two commands a user would, for seeds 0, 1 and 2:

    ctfgen sample --pipeline P --per-class 1000 --batch 250 --dtype bf16 --seed S [--baseline] --npz RUNS/NAME.seedS.npz
    ctfgen eval --samples RUNS/NAME.seedS.npz --json > RUNS/NAME.seedS.json

(a draw whose JSON is already in --runs is reused), then writes one small JSON: each row's metrics per draw, their
mean and standard deviation over the draws (n - 1), and each CTF row's mean FID over the baseline's. Rows: the
baseline and CTF of --pipeline ("ctf_k128" for K = 128), and one CTF row per --ctf NAME=PIPELINE (e.g. a K = 512
pair from step 12 of scripts/reproduce_fmnist.sh, or a deeper stage 1); each CTF row also gives its stage 1's
matmul weights (the FLOPs of a decode step per token, over two) over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from ctfgen.bench import matmul_weights
from ctfgen.files import write_atomic
from ctfgen.pipeline import CTFPipeline

METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
CTFGEN = [sys.executable, "-m", "ctfgen.cli"]


def draw(pipeline: str, name: str, seed: int, flags: list[str], runs: Path) -> dict:
    """The `ctfgen eval` report of one draw of 10,000 samples (`ctfgen sample` with `flags` besides the fixed ones,
    e.g. --baseline), sampled and scored unless already on disk."""
    report = runs / f"{name}.seed{seed}.json"
    if not report.exists():
        npz = runs / f"{name}.seed{seed}.npz"
        subprocess.run([*CTFGEN, "sample", "--pipeline", pipeline, "--per-class", "1000", "--batch", "250",
                        "--dtype", "bf16", "--seed", str(seed), *flags,
                        "--npz", str(npz), "--overwrite"], check=True)
        scored = subprocess.run([*CTFGEN, "eval", "--samples", str(npz), "--json"], check=True,
                                capture_output=True, text=True).stdout
        write_atomic(report, lambda tmp: Path(tmp).write_text(scored))
    return json.loads(report.read_text())


def row(pipeline: str, name: str, seeds: list[int], flags: list[str], runs: Path) -> dict:
    """One model's draws (`ctfgen sample` with `flags`, e.g. --baseline), their mean and standard deviation."""
    draws = [{"seed": s, **{m: draw(pipeline, name, s, flags, runs)[m] for m in METRICS}} for s in seeds]
    return {"pipeline": pipeline, "mode": "baseline" if "--baseline" in flags else "ctf", "draws": draws,
            "mean": {m: statistics.mean(d[m] for d in draws) for m in METRICS},
            "std": {m: statistics.stdev(d[m] for d in draws) if len(draws) > 1 else None for m in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist", help="a CTF pipeline with its baseline")
    parser.add_argument("--ctf", action="append", default=[], metavar="NAME=PIPELINE",
                        help="another CTF row: its name and pipeline (repeatable)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="runs/eval", help="where the sample files and their reports go")
    parser.add_argument("--out", default="docs/results/table1_convergence.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    others = dict(named.split("=", 1) for named in args.ctf)
    pipes = {path: CTFPipeline.from_pretrained(path) for path in {args.pipeline, *others.values()}}  # before sampling
    rows = {"baseline": row(args.pipeline, "baseline", seeds, ["--baseline"], runs),
            f"ctf_k{pipes[args.pipeline].coarse_map.k}": row(args.pipeline, "ctf", seeds, [], runs),
            **{name: row(pipeline, name, seeds, [], runs) for name, pipeline in others.items()}}
    baseline_weights = matmul_weights(pipes[args.pipeline].baseline)
    for name in rows:
        if name != "baseline":
            stage1 = pipes[rows[name]["pipeline"]].stage1
            rows[name] |= {"k": stage1.config.vocab_size, "stage1_layers": stage1.config.n_layer,
                           "stage1_cost_over_baseline": matmul_weights(stage1) / baseline_weights,
                           "fid_over_baseline": rows[name]["mean"]["fid"] / rows["baseline"]["mean"]["fid"]}
    result = {"command": "python " + " ".join(sys.argv), "n_samples": 10000, "dtype": "bf16", "seeds": seeds,
              "rows": rows}
    text = json.dumps(result, indent=1)
    write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
