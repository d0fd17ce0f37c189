"""The speed-quality frontier: FID against images/s for the baseline at several sizes and CTF with a full and a
small refiner, at batch 1, 16 and 64, and the time to the first preview and to the final image at batch 1.

    python experiments/frontier.py --points experiments/frontier_points.json \
        --json docs/results/frontier.json --plot docs/frontier.png
    python experiments/frontier.py --plot-only --json docs/results/frontier.json --plot docs/frontier.png   # redraw

`--points` names each point's parts (checkpoint directories; the tokenizer, coarse map and class names come from
`pipeline`; a point may instead name a whole assembled "pipeline" of its own, e.g. with another K or tokenizer,
whose baseline or CTF it then is) and the line it belongs to; a point's "quality" may name the `ctfgen eval --json`
report of the same draw, which is then read instead of sampled. Speed: every point at every batch size, timed
interleaved (repeat r runs all of them before repeat r + 1 starts, so load from other processes hits them alike),
median of `--repeats` after a warm-up, in the transformers' `--dtype`, with torch's threads. At batch 1 the time to
the first preview is when a streaming client (the web demo) has CTF's whole coarse grid decoded as cluster means:
stage 1 done, stage 2 not yet; the baseline has no preview. Quality: FID (and the other `ctfgen eval` metrics) of
`--per-class` x 10 samples drawn as `ctfgen sample --per-class N --batch 250 --seed S --dtype D` draws them, cached
under `--cache` by a key over the parts' weights, the settings, the count, the seed and the dtype, so that
re-running re-times but never re-samples. Prints the table, the Pareto verdict (CTF dominates the baseline when
every baseline point has a CTF point with a lower FID and at least its images/s, at each batch size) and the goal of
issue 21 (a CTF point at or below the best baseline's FID at 0.9x its images/s or more at batch 64).

    python experiments/frontier.py --points experiments/frontier_points_k512.json \
        --json docs/results/frontier_k512.json --plot docs/frontier_k512.png
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ctfgen.backends.precision import cpu_has_fast_bf16
from ctfgen.bench import cpu_description
from ctfgen.checkpoint import DTYPES
from ctfgen.evaluation import evaluate_pipeline, load_feature_network
from ctfgen.evaluation.frontier import goal, pareto
from ctfgen.files import write_atomic
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import STAGE1_DEFAULTS, STAGE2_DEFAULTS

BATCHES = (1, 16, 64)
METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
FID_BATCH = 250  # `ctfgen sample`'s batch for the FID samples (a seed's images depend on the batch size's kernels)


def load_points(path: Path, skip_missing: bool = False) -> list[dict]:
    """The points, each with its CTFPipeline under "pipe" (the tokenizer, coarse map and class names from the
    spec's `pipeline`). With `skip_missing`, points whose parts are not there yet (still training) are left out."""
    spec = json.loads(path.read_text())
    shared = CTFPipeline.from_pretrained(spec["pipeline"])
    points = []
    for point in spec["points"]:
        if skip_missing and not all((Path(part) / "model.safetensors").is_file() for part in parts_of(point)):
            print(f"{point['name']}: parts not there yet, skipped")
            continue
        if "pipeline" in point:  # an assembled pipeline: its own coarse map (another K) or tokenizer (another V)
            pipe = CTFPipeline.from_pretrained(point["pipeline"])
        elif point["method"] == "baseline":
            pipe = CTFPipeline(shared.tokenizer, baseline=GPT.from_pretrained(point["baseline"]),
                               class_names=shared.class_names)
        else:
            pipe = CTFPipeline(shared.tokenizer, shared.coarse_map, GPT.from_pretrained(point["stage1"]),
                               Refiner.from_pretrained(point["stage2"]), class_names=shared.class_names)
        points.append({**point, "pipe": pipe})
    return points


def parts_of(point: dict) -> list[str]:
    if "pipeline" in point:
        names = ["baseline"] if point["method"] == "baseline" else ["stage1", "stage2"]
        return [f"{point['pipeline']}/{name}" for name in names]
    if point["method"] == "baseline":
        return [point["baseline"]]
    return [point["stage1"], point["stage2"]]


def params_of(pipe: CTFPipeline, method: str) -> dict:
    if method == "baseline":
        return {"baseline": pipe.baseline.num_params()}
    return {"stage1": pipe.stage1.num_params(), "stage2": pipe.stage2.num_params()}


def cache_key(point: dict, per_class: int, seed: int, dtype: str) -> str:
    """What the FID depends on: the weights (by content), the method, the settings, the count, seed and dtype."""
    digest = hashlib.sha256()
    for part in parts_of(point):
        digest.update(hashlib.sha256((Path(part) / "model.safetensors").read_bytes()).digest())
    settings = {"method": point["method"], "sampling": asdict(STAGE1_DEFAULTS), "stage2": asdict(STAGE2_DEFAULTS),
                "per_class": per_class, "seed": seed, "dtype": dtype, "batch": FID_BATCH}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def quality(point: dict, per_class: int, seed: int, dtype: str, cache: Path, network_box: list) -> dict:
    """The point's metrics from its "quality" report (`ctfgen eval --json` of the same draw, made by `ctfgen sample`
    as above, e.g. by experiments/table1.py), else from the cache, else sampled and scored (minutes) and cached."""
    if "quality" in point:
        report = json.loads(Path(point["quality"]).read_text())
        return {key: report[key] for key in METRICS} | {"n_samples": report["n_samples"], "seconds": None}
    path = cache / f"{cache_key(point, per_class, seed, dtype)}.json"
    if path.exists():
        return json.loads(path.read_text())
    if not network_box:
        network_box.append(load_feature_network("fmnist"))
    tic = time.perf_counter()
    result = evaluate_pipeline(point["pipe"].copy(DTYPES[dtype]), network_box[0], per_class, batch_size=FID_BATCH,
                               seed=seed, mode=point["method"])
    metrics = {key: result[key] for key in METRICS} | {"n_samples": result["n_samples"],
                                                       "seconds": round(time.perf_counter() - tic, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"{point['name']}: FID {metrics['fid']:.2f} ({metrics['n_samples']} samples, {metrics['seconds']} s)",
          flush=True)
    return metrics


def timed_request(pipe: CTFPipeline, method: str, batch: int) -> callable:
    """One timed unit at `batch`: max(batch, 4) images (4 one after another at batch 1), as seconds per image."""
    n = max(batch, 4)
    labels = torch.arange(n) % pipe.num_classes

    def run() -> float:
        tic = time.perf_counter()
        pipe(labels, mode=method, batch_size=batch, seed=0, output_type="pt")
        return (time.perf_counter() - tic) / n
    return run


def latency(pipe: CTFPipeline, method: str) -> dict:
    """One image at batch 1: seconds to the first preview (CTF: stage 1 done and its grid decoded as cluster
    means, as the web demo streams it) and to the final image."""
    tic, preview_at = time.perf_counter(), []
    steps = pipe.grid ** 2

    def on_step(first, step, tokens):
        if method == "ctf" and step == steps and not preview_at:
            pipe.decode_preview(tokens.view(-1, pipe.grid, pipe.grid))
            preview_at.append(time.perf_counter() - tic)

    pipe([0], mode=method, batch_size=1, seed=0, output_type="pt", callback=on_step, callback_steps=steps)
    return {"first_preview_s": preview_at[0] if preview_at else None, "final_s": time.perf_counter() - tic}


def speed(points: list[dict], dtype: str, repeats: int) -> None:
    """images/s at each batch size and batch-1 latencies of every point, interleaved; into each point."""
    pipes = [point["pipe"].copy(DTYPES[dtype]) for point in points]
    units = {(i, batch): timed_request(pipe, point["method"], batch)
             for i, (point, pipe) in enumerate(zip(points, pipes)) for batch in BATCHES}
    seconds = {key: [] for key in units}
    latencies = {i: [] for i in range(len(points))}
    for unit in units.values():  # warm-up: first calls allocate caches and pick kernels
        unit()
    for _ in range(repeats):
        for key, unit in units.items():
            seconds[key].append(unit())
        for i, (point, pipe) in enumerate(zip(points, pipes)):
            latencies[i].append(latency(pipe, point["method"]))
    for i, point in enumerate(points):
        point["images_per_s"] = {str(b): 1 / statistics.median(seconds[(i, b)]) for b in BATCHES}
        for key in ("first_preview_s", "final_s"):
            values = [lat[key] for lat in latencies[i] if lat[key] is not None]
            point[key] = statistics.median(values) if values else None


def table(points: list[dict]) -> str:
    rows = ["| point | params (M) | FID | images/s @1 | @16 | @64 | batch 1: first preview | final image |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        params = " + ".join(f"{n / 1e6:.1f}" for n in p["params"].values())
        preview = f"{p['first_preview_s'] * 1000:.0f} ms" if p["first_preview_s"] else "-"
        ips = " | ".join(f"{p['images_per_s'][str(b)]:.1f}" for b in BATCHES)
        rows.append(f"| {p['name']} | {params} | {p['fid']:.1f} | {ips} | {preview} | {p['final_s'] * 1000:.0f} ms |")
    return "\n".join(rows)


def plot(result: dict, out: str) -> None:
    """One panel per batch size: FID against images/s, a line per method through its sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    points = result["points"]
    lines = list(dict.fromkeys(p["line"] for p in points))
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(10, 3.6), dpi=120, sharey=True)
    for ax, batch in zip(axes, map(str, BATCHES)):
        for line, marker in zip(lines, itertools.cycle("osD^vPX*")):  # every line drawn, however many
            mine = sorted((p for p in points if p["line"] == line), key=lambda p: p["images_per_s"][batch])
            xs, ys = [p["images_per_s"][batch] for p in mine], [p["fid"] for p in mine]
            drawn = ax.plot(xs, ys, marker=marker, label=line)[0]
            for p, x, y in zip(mine, xs, ys):
                ax.annotate(p["size"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=drawn.get_color())
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_xlabel("images/s")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"FID ({result['n_samples']} samples; lower is better)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Fashion-MNIST; CPU threads: {result['machine']['threads']}; {result['dtype']}; labels: stage-1 "
                 f"or baseline size", fontsize=9)
    fig.tight_layout()
    write_atomic(Path(out), lambda tmp: fig.savefig(tmp, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="experiments/frontier_points.json")
    parser.add_argument("--per-class", type=int, default=1000, help="FID samples per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if cpu_has_fast_bf16() else "fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="runs/frontier/fid", help="FID cache directory")
    parser.add_argument("--json", default="frontier.json", help="write (or, with --plot-only, read) the results")
    parser.add_argument("--plot", default="frontier.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --json")
    parser.add_argument("--fid-only", action="store_true", help="only sample and cache the FIDs of the points "
                        "whose parts exist (e.g. while others still train); no timing, no --json")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.json).read_text()), args.plot)
        return
    points = load_points(Path(args.points), skip_missing=args.fid_only)
    network_box = []
    for point in points:
        point |= quality(point, args.per_class, args.seed, args.dtype, Path(args.cache), network_box)
        point["params"] = params_of(point["pipe"], point["method"])
    if args.fid_only:
        return
    speed(points, args.dtype, args.repeats)
    machine = {"cpu": cpu_description(), "threads": torch.get_num_threads(),
               "fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__}
    result = {"dtype": args.dtype, "seed": args.seed, "n_samples": points[0]["n_samples"], "machine": machine,
              "points": [{k: v for k, v in p.items() if k != "pipe"} for p in points]}
    result["pareto"] = pareto(result["points"])
    result["goal"] = goal(result["points"])
    write_atomic(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    plot(result, args.plot)
    print(table(result["points"]))
    print(json.dumps({"pareto": result["pareto"], "goal": result["goal"]}, indent=1))


if __name__ == "__main__":
    main()
