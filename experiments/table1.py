"""Paper Table 1 in small: CTF against the baseline at convergence, three draws of 10,000 samples per model.

    python experiments/table1.py --pipeline pretrained/fmnist --k512-pipeline runs/kconv/pipe_k512 \
        --out docs/results/table1_convergence.json

Each draw runs the two commands a user would, for seeds 0, 1 and 2:

    ctfgen sample --pipeline P --per-class 1000 --batch 250 --dtype bf16 --seed S [--baseline] --npz RUNS/NAME.seedS.npz
    ctfgen eval --samples RUNS/NAME.seedS.npz --json > RUNS/NAME.seedS.json

(a draw whose JSON is already in --runs is reused), then writes one small JSON: each row's metrics per draw, their
mean and standard deviation over the draws (n - 1), and each CTF row's mean FID over the baseline's. The K = 512 row
needs its pipeline (step 12 of scripts/reproduce_fmnist.sh); without --k512-pipeline it is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from ctfgen.files import write_atomic

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


def row(pipeline: str, name: str, seeds: list[int], baseline: bool, runs: Path) -> dict:
    flags = ["--baseline"] if baseline else []
    draws = [{"seed": s, **{m: draw(pipeline, name, s, flags, runs)[m] for m in METRICS}} for s in seeds]
    return {"pipeline": pipeline, "mode": "baseline" if baseline else "ctf", "draws": draws,
            "mean": {m: statistics.mean(d[m] for d in draws) for m in METRICS},
            "std": {m: statistics.stdev(d[m] for d in draws) for m in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist", help="the K = 128 pipeline, with its baseline")
    parser.add_argument("--k512-pipeline", help="a K = 512 pipeline trained alike (reproduce step 12)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="runs/eval", help="where the sample files and their reports go")
    parser.add_argument("--out", default="docs/results/table1_convergence.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows = {"baseline": row(args.pipeline, "baseline", seeds, True, runs),
            "ctf_k128": row(args.pipeline, "ctf", seeds, False, runs)}
    if args.k512_pipeline:
        rows["ctf_k512"] = row(args.k512_pipeline, "ctf_k512", seeds, False, runs)
    for name in rows:
        if name != "baseline":
            rows[name]["fid_over_baseline"] = rows[name]["mean"]["fid"] / rows["baseline"]["mean"]["fid"]
    result = {"command": "python " + " ".join(sys.argv), "n_samples": 10000, "dtype": "bf16", "seeds": seeds,
              "rows": rows}
    text = json.dumps(result, indent=1)
    write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
