"""FID against training progress, CTF vs the baseline (the paper's Figure 2, in small).

    python experiments/fid_curve.py --runs runs/conv --pipeline pretrained/fmnist --per-class 200 \
        --out pretrained/fmnist/fid_curve.png

Scores the snapshots that `ctfgen train --snapshot-every` wrote under `<runs>/{baseline,stage1,stage2}/snapshots/
step_N`: the baseline at every step it has a snapshot of, CTF at every step that both stage 1 and stage 2 have
(stage 1 and stage 2 of step N together). Each point samples `--per-class` images of every class (with the
tokenizer and coarse map of `--pipeline`) and scores them with `ctfgen eval`'s metrics against the test split.
Points are cached in `<runs>/fid_curve.jsonl` by (method, step, images, seed), so the script can run while the
runs are still training, and again later to add the new points and redraw the plot. The x axis is in epochs
(step x batch size / training images, from each run's train_config.json and its codes). FID of a few thousand
samples is biased upwards against 10k-sample figures; compare the points with each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctfgen.checkpoint import DTYPES
from ctfgen.data.codes import read_manifest
from ctfgen.evaluation import evaluate_pipeline, load_feature_network
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner
from ctfgen.pipeline import CTFPipeline

METRICS = ("fid", "inception_score", "precision", "recall", "accuracy")
RUNS = {"baseline": ("baseline",), "ctf": ("stage1", "stage2")}  # method -> the runs it needs a snapshot of


def snapshot_steps(runs: Path, method: str) -> list[int]:
    steps = [{int(p.name.removeprefix("step_")) for p in (runs / run / "snapshots").glob("step_*")
              if (p / "model.safetensors").is_file()} for run in RUNS[method]]
    return sorted(set.intersection(*steps))


def epochs_per_step(run: Path) -> float:
    config = json.loads((run / "train_config.json").read_text())
    return config["batch_size"] / read_manifest(config["codes"])["count"]


def method_pipeline(shipped: CTFPipeline, runs: Path, method: str, step: int) -> CTFPipeline:
    snapshot = {run: runs / run / "snapshots" / f"step_{step:07d}" for run in RUNS[method]}
    if method == "baseline":
        return CTFPipeline(shipped.tokenizer, baseline=GPT.from_pretrained(snapshot["baseline"]),
                           class_names=shipped.class_names)
    return CTFPipeline(shipped.tokenizer, shipped.coarse_map, GPT.from_pretrained(snapshot["stage1"]),
                       Refiner.from_pretrained(snapshot["stage2"]), class_names=shipped.class_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/conv")
    parser.add_argument("--pipeline", default="pretrained/fmnist", help="for its tokenizer and coarse map")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="ctf,baseline", help="comma-separated: ctf, baseline")
    parser.add_argument("--every", type=int, default=1, help="score every N-th snapshot (and always the last)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the transformers' dtype")
    parser.add_argument("--out", default="fid_curve.png")
    args = parser.parse_args()
    runs, shipped = Path(args.runs), CTFPipeline.from_pretrained(args.pipeline)
    cache = runs / "fid_curve.jsonl"
    points = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    done = {(p["method"], p["step"], p["n"], p["seed"]) for p in points}
    network, n = None, args.per_class * shipped.num_classes
    for method in args.methods.split(","):
        steps = snapshot_steps(runs, method)
        for step in steps[args.every - 1::args.every] + steps[-1:]:
            if (method, step, n, args.seed) in done:
                continue
            network = network or load_feature_network("fmnist")
            pipe = method_pipeline(shipped, runs, method, step).copy(DTYPES[args.dtype])
            result = evaluate_pipeline(pipe, network, args.per_class,
                                       mode=method, batch_size=args.batch, seed=args.seed)
            point = {"method": method, "step": step, "n": n, "seed": args.seed, "dtype": args.dtype,
                     "epoch": round(step * epochs_per_step(runs / RUNS[method][0]), 3),
                     **{key: result[key] for key in METRICS}}
            print(json.dumps(point), flush=True)
            with cache.open("a") as f:
                f.write(json.dumps(point) + "\n")
            points.append(point)
            done.add((method, step, n, args.seed))
    points = [p for p in points if p["n"] == n and p["seed"] == args.seed]
    if not points:
        raise SystemExit(f"fid_curve: error: no snapshots under {runs}/{{baseline,stage1,stage2}}/snapshots")
    plot(points, args.out, n)
    print(json.dumps({"points": sorted(points, key=lambda p: (p["method"], p["step"])), "plot": args.out}, indent=2))


def plot(points: list[dict], out: str, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for method, label in (("baseline", "baseline (AR over 4096 tokens)"), ("ctf", "CTF (K = 128, + refiner)")):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["step"])
        if mine:
            ax.plot([p["epoch"] for p in mine], [p["fid"] for p in mine], marker="o", label=label)
    ax.set_xlabel("epochs of the 60,000 training images")
    ax.set_ylabel(f"FID ({n} samples, fmnist features)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
