"""FID against training progress, CTF vs the baseline (the paper's Figure 2, in small).

    python scripts/fid_curve.py --runs runs/fmnist --pipeline pretrained/fmnist --per-class 200 \
        --steps 500,700,1000 --out pretrained/fmnist/fid_curve.png

For every step that has a snapshot in all three runs (`<runs>/{baseline,stage1,stage2}/snapshots/step_N`,
written by `ctfgen train --snapshot-every`), samples `--per-class` images of every class from CTF (stage 1
and stage 2 of step N) and from the baseline (step N), with the tokenizer and coarse map of `--pipeline`,
and scores them with `ctfgen eval`'s metrics against the test split. Writes the plot and prints JSON. FID
of a few thousand samples is biased upwards against 10k-sample figures; compare points with each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctfgen.evaluation import evaluate_pipeline, load_feature_network
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner
from ctfgen.pipeline import CTFPipeline

RUNS = ("baseline", "stage1", "stage2")


def common_steps(runs: Path) -> list[int]:
    steps = [{int(p.name.removeprefix("step_")) for p in (runs / run / "snapshots").glob("step_*")} for run in RUNS]
    return sorted(set.intersection(*steps))


def score(pipe: CTFPipeline, mode: str, per_class: int, network, batch: int) -> dict:
    result = evaluate_pipeline(pipe, network, per_class, mode=mode, batch_size=batch)
    return {key: result[key] for key in ("fid", "inception_score", "precision", "recall", "accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/fmnist")
    parser.add_argument("--pipeline", default="pretrained/fmnist", help="for its tokenizer and coarse map")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", help="comma-separated steps to score (default: every common snapshot)")
    parser.add_argument("--out", default="fid_curve.png")
    args = parser.parse_args()
    runs, shipped = Path(args.runs), CTFPipeline.from_pretrained(args.pipeline)
    network = load_feature_network("fmnist")
    points = []
    steps = common_steps(runs)
    if args.steps:
        wanted = [int(s) for s in args.steps.split(",")]
        missing = sorted(set(wanted) - set(steps))
        if missing:
            raise SystemExit(f"fid_curve: error: no snapshot of step(s) {missing} in all of {', '.join(RUNS)}")
        steps = wanted
    for step in steps:
        snapshot = {run: runs / run / "snapshots" / f"step_{step:07d}" for run in RUNS}
        pipe = CTFPipeline(shipped.tokenizer, shipped.coarse_map, GPT.from_pretrained(snapshot["stage1"]),
                           Refiner.from_pretrained(snapshot["stage2"]), GPT.from_pretrained(snapshot["baseline"]))
        point = {"step": step, **{mode: score(pipe, mode, args.per_class, network, args.batch)
                                  for mode in ("ctf", "baseline")}}
        print(json.dumps(point), flush=True)
        points.append(point)
    if not points:
        raise SystemExit(f"fid_curve: error: no step has a snapshot in all of {', '.join(RUNS)} under {runs}")
    plot(points, args.out, args.per_class * shipped.num_classes)
    print(json.dumps({"points": points, "plot": args.out}, indent=2))


def plot(points: list[dict], out: str, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    steps = [p["step"] for p in points]
    for mode, label in (("baseline", "baseline (AR over 4096 tokens)"), ("ctf", "CTF (K = 128, + refiner)")):
        ax.plot(steps, [p[mode]["fid"] for p in points], marker="o", label=label)
    ax.set_xlabel("training step (batch 32)")
    ax.set_ylabel(f"FID ({n} samples, fmnist features)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
