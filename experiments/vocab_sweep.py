"""The vocabulary sweep (issue 21, part 1): does CTF's gap to the baseline shrink as the codebook grows, and cross?

    python experiments/vocab_sweep.py --results docs/results/vocab_sweep --out docs/vocab_sweep.json \
        --plot docs/vocab_sweep.png

Reads what experiments/vocab_sweep.sh leaves in --results for each vocabulary size V:
    table1_vV.json          experiments/table1.py: the baseline and CTF rows, three draws of 10,000 samples each
    tokenizer_vV.json       `ctfgen tokenizer eval --json`: PSNR and codebook usage on the test split
    reconstruction_vV.json  `ctfgen eval --reconstruction --json`: the reconstructions' FID (rFID)
    coarse_nll_vV_kK.json   experiments/coarse_nll.py: next-coarse-label NLL of stage 1 and of the baseline, and
                            each model's NLL of the fine tokens split into coarse and within-cluster parts
and writes one JSON: a row per (V, training, model, K) with each metric per draw, its mean and standard deviation
(and, for a pipeline that `ctfgen fit` made, how far each of its models' held-out loss moved over the last quarter of
training, from the fit's report.json), the tokenizers, and the verdict (for each V the best CTF's mean FID over the
baseline's; whether that ratio falls as V grows, and whether it goes below 1). A V whose table is not there yet is
left out and named under "missing". Files named `..._vV_tN...` are a further training N of V's recipe (training 1
has no suffix): their rows carry "training": N, the verdict is taken on training 1, and "training_noise" sets each
V's trainings side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from ctfgen.files import write_atomic
from ctfgen.fit.report import last_quarter_drop

METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
NLL_FIELDS = ("stage1_coarse_nll", "baseline_coarse_nll", "stage2_within_nll", "baseline_within_nll", "ctf_fine_nll",
              "baseline_fine_nll")  # coarse_nll.py's, nats per token
VOCABS = (1024, 4096, 16384)


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def suffix(training: int) -> str:
    return "" if training == 1 else f"_t{training}"


def model_rows(vocab: int, training: int, table: dict, results: Path) -> list[dict]:
    rows = []
    for name, entry in table["rows"].items():
        k = entry.get("k") if entry["mode"] == "ctf" else None
        row = {"vocab_size": vocab, "training": training, "k": k, "model": entry["mode"], "name": name,
               "pipeline": entry["pipeline"]}
        for metric in METRICS:
            values = [draw[metric] for draw in entry["draws"]]
            row[metric] = values
            row[f"{metric}_mean"] = statistics.mean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None  # as table1.py's
        moved = held_out_moved(entry["pipeline"], ("stage1", "stage2") if k is not None else ("baseline",))
        if moved is not None:
            row["held_out_loss_moved_last_quarter"] = moved
        if k is not None:
            row["fid_over_baseline"] = entry["fid_over_baseline"]
            nll = read(results / f"coarse_nll_v{vocab}{suffix(training)}_k{k}.json")
            row |= {name: nll[name] for name in NLL_FIELDS if name in (nll or {})}
        rows.append(row)
    return rows


def held_out_moved(pipeline: str, stages: tuple[str, ...]) -> dict | None:
    """How far each stage's held-out loss moved over the last quarter of its training, from the first measurement at
    or after three quarters of the steps to the last (the fit's report.json beside the pipeline): the sweep's test of
    convergence. None for a pipeline made without `ctfgen fit` (the shipped one)."""
    report = read(Path(pipeline).parent / "report.json")
    if report is None:
        return None
    drops = {stage: last_quarter_drop(report["training"][stage]) for stage in stages}
    return {stage: None if drop is None else -drop for stage, drop in drops.items()}


def tokenizer_row(vocab: int, training: int, results: Path) -> dict:
    evaluated = read(results / f"tokenizer_v{vocab}{suffix(training)}.json") or {}
    reconstruction = read(results / f"reconstruction_v{vocab}{suffix(training)}.json") or {}
    return {"vocab_size": vocab, "training": training, "psnr": evaluated.get("psnr"),
            "codebook_usage": evaluated.get("codebook_usage"),
            "codes_used": evaluated.get("codes_used"), "rfid": reconstruction.get("fid")}


def verdict(rows: list[dict]) -> dict:
    """Per V, the best CTF's mean FID over the baseline's (training 1); does it fall with V, and go below 1? CTF beats
    the baseline at a V only where their draws set them apart (mean + std below the baseline's mean - std); where
    those ranges overlap it ties, whichever mean is lower."""
    rows = [r for r in rows if r["training"] == 1]
    gap, beats, ties = {}, [], []
    for vocab in sorted({r["vocab_size"] for r in rows}):
        ctf = [r for r in rows if r["vocab_size"] == vocab and r["model"] == "ctf"]
        base = next((r for r in rows if r["vocab_size"] == vocab and r["model"] == "baseline"), None)
        if not ctf:
            continue
        best = min(ctf, key=lambda r: r["fid_over_baseline"])
        gap[str(vocab)] = best["fid_over_baseline"]
        if base is None:
            continue
        if abs(best["fid_mean"] - base["fid_mean"]) <= best["fid_std"] + base["fid_std"]:
            ties.append(vocab)
        elif best["fid_mean"] < base["fid_mean"]:
            beats.append(vocab)
    ratios = list(gap.values())
    return {"best_ctf_fid_over_baseline": gap,
            "gap_shrinks_with_vocab": len(ratios) > 1 and all(b < a for a, b in zip(ratios, ratios[1:])),
            "ctf_beats_baseline_at": beats, "ctf_ties_baseline_at": ties}


def training_noise(rows: list[dict]) -> dict:
    """For each model trained more than once (same V, same K): its mean FID per training, and for CTF its ratio to
    the baseline of the same training."""
    again = {(r["vocab_size"], r["name"]) for r in rows if r["training"] > 1}
    noise = {}
    for r in sorted(rows, key=lambda r: r["training"]):
        if (r["vocab_size"], r["name"]) in again:
            entry = noise.setdefault(str(r["vocab_size"]), {}).setdefault(r["name"], {"fid_mean": []})
            entry["fid_mean"].append(r["fid_mean"])
            if r["model"] == "ctf":
                entry.setdefault("fid_over_baseline", []).append(r["fid_over_baseline"])
    return noise


def plot(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    lines = {"baseline": lambda r: r["model"] == "baseline",
             "CTF, K = V/32": lambda r: r["model"] == "ctf" and r["k"] * 32 == r["vocab_size"],
             "CTF, K = V/8": lambda r: r["model"] == "ctf" and r["k"] * 8 == r["vocab_size"]}
    for (label, keep), marker in zip(lines.items(), "osD"):
        mine = sorted((r for r in result["rows"] if keep(r) and r["training"] == 1), key=lambda r: r["vocab_size"])
        if mine:
            means = [r["fid_mean"] for r in mine]
            spread = [statistics.stdev(r["fid"]) if len(r["fid"]) > 1 else 0 for r in mine]
            line = ax.errorbar([r["vocab_size"] for r in mine], means, yerr=spread, marker=marker, capsize=3,
                               label=label)
            again = [r for r in result["rows"] if keep(r) and r["training"] > 1]
            if again:  # a further training of the same recipe: how far a point moves when trained again
                ax.scatter([r["vocab_size"] * 1.08 for r in again], [r["fid_mean"] for r in again], marker=marker,
                           facecolors="none", edgecolors=line[0].get_color(), label=f"{label}, trained again")
    ax.set_xscale("log", base=2)
    ax.set_xlim(VOCABS[0] / 1.5, VOCABS[-1] * 1.5)  # the whole sweep, measured or not yet
    ax.set_xticks(VOCABS, [f"{v:,}" for v in VOCABS])
    ax.set_xlabel("codebook size V")
    ax.set_ylabel("FID (10,000 samples; mean of draws)")
    ax.set_title("Fashion-MNIST: FID against the vocabulary", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(Path(out), lambda tmp: fig.savefig(tmp, format="png"))


def measured(results: Path, kind: str) -> dict[tuple[int, int], Path]:
    """The files of one kind ("table1", "tokenizer") in --results, by (V, training)."""
    found = {}
    for path in results.glob(f"{kind}_v*.json"):
        vocab, training = re.fullmatch(rf"{kind}_v(\d+)(?:_t(\d+))?\.json", path.name).groups()
        found[int(vocab), int(training or 1)] = path
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/results/vocab_sweep")
    parser.add_argument("--out", default="docs/vocab_sweep.json")
    parser.add_argument("--plot", help="PNG of FID against V (needs matplotlib)")
    args = parser.parse_args()
    results = Path(args.results)
    tables = {key: json.loads(path.read_text()) for key, path in measured(results, "table1").items()}
    tokenizers = sorted(tables.keys() | measured(results, "tokenizer").keys())  # a tokenizer before its models
    rows = [row for key in sorted(tables) for row in model_rows(*key, tables[key], results)]
    result = {"command": "python " + " ".join(sys.argv), "rows": rows,
              "tokenizers": [tokenizer_row(*key, results) for key in tokenizers],
              "missing": [v for v in VOCABS if (v, 1) not in tables], "verdict": verdict(rows),
              "training_noise": training_noise(rows)}
    write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result["verdict"], indent=1))


if __name__ == "__main__":
    main()
