"""The vocabulary sweep (issue 21, part 1): does CTF's gap to the baseline shrink as the codebook grows, and cross?

    python experiments/vocab_sweep.py --results docs/results/vocab_sweep --out docs/vocab_sweep.json \
        --plot docs/vocab_sweep.png

Reads what experiments/vocab_sweep.sh leaves in --results for each vocabulary size V:
    table1_vV.json          experiments/table1.py: the baseline and CTF rows, three draws of 10,000 samples each
    tokenizer_vV.json       `ctfgen tokenizer eval --json`: PSNR and codebook usage on the test split
    reconstruction_vV.json  `ctfgen eval --reconstruction --json`: the reconstructions' FID (rFID)
    coarse_nll_vV_kK.json   experiments/coarse_nll.py: next-coarse-label NLL of stage 1 and of the baseline
and writes one JSON: a row per (V, model, K) with each metric per draw and its mean, the tokenizers, and the verdict
(for each V the best CTF's mean FID over the baseline's; whether that ratio falls as V grows, and whether it goes
below 1). A V whose table is not there yet is left out and named under "missing".
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from ctfgen.files import write_atomic

METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
VOCABS = (1024, 4096, 16384)


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def model_rows(vocab: int, table: dict, results: Path) -> list[dict]:
    rows = []
    for name, entry in table["rows"].items():
        k = entry.get("k") if entry["mode"] == "ctf" else None
        row = {"vocab_size": vocab, "k": k, "model": entry["mode"], "name": name, "pipeline": entry["pipeline"]}
        for metric in METRICS:
            values = [draw[metric] for draw in entry["draws"]]
            row[metric] = values
            row[f"{metric}_mean"] = statistics.mean(values)
        if k is not None:
            row["fid_over_baseline"] = entry["fid_over_baseline"]
            nll = read(results / f"coarse_nll_v{vocab}_k{k}.json")
            if nll:
                row["stage1_coarse_nll"] = nll["stage1_coarse_nll"]
                row["baseline_coarse_nll"] = nll["baseline_coarse_nll"]
        rows.append(row)
    return rows


def tokenizer_row(vocab: int, results: Path) -> dict:
    evaluated = read(results / f"tokenizer_v{vocab}.json") or {}
    reconstruction = read(results / f"reconstruction_v{vocab}.json") or {}
    return {"vocab_size": vocab, "psnr": evaluated.get("psnr"), "codebook_usage": evaluated.get("codebook_usage"),
            "codes_used": evaluated.get("codes_used"), "rfid": reconstruction.get("fid")}


def verdict(rows: list[dict]) -> dict:
    """Per V, the best CTF's mean FID over the baseline's; does it fall with V, and does it go below 1?"""
    gap = {}
    for vocab in sorted({r["vocab_size"] for r in rows}):
        ctf = [r["fid_over_baseline"] for r in rows if r["vocab_size"] == vocab and r["model"] == "ctf"]
        if ctf:
            gap[str(vocab)] = min(ctf)
    ratios = list(gap.values())
    return {"best_ctf_fid_over_baseline": gap,
            "gap_shrinks_with_vocab": len(ratios) > 1 and all(b < a for a, b in zip(ratios, ratios[1:])),
            "ctf_beats_baseline_at": [int(v) for v, ratio in gap.items() if ratio < 1]}


def plot(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    lines = {"baseline": lambda r: r["model"] == "baseline",
             "CTF, K = V/32": lambda r: r["model"] == "ctf" and r["k"] * 32 == r["vocab_size"],
             "CTF, K = V/8": lambda r: r["model"] == "ctf" and r["k"] * 8 == r["vocab_size"]}
    for (label, keep), marker in zip(lines.items(), "osD"):
        mine = sorted((r for r in result["rows"] if keep(r)), key=lambda r: r["vocab_size"])
        if mine:
            means = [r["fid_mean"] for r in mine]
            spread = [statistics.stdev(r["fid"]) if len(r["fid"]) > 1 else 0 for r in mine]
            ax.errorbar([r["vocab_size"] for r in mine], means, yerr=spread, marker=marker, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size V")
    ax.set_ylabel("FID (10,000 samples; mean of draws)")
    ax.set_title("Fashion-MNIST: FID against the vocabulary", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(Path(out), lambda tmp: fig.savefig(tmp, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/results/vocab_sweep")
    parser.add_argument("--out", default="docs/vocab_sweep.json")
    parser.add_argument("--plot", help="PNG of FID against V (needs matplotlib)")
    args = parser.parse_args()
    results = Path(args.results)
    tables = {int(re.fullmatch(r"table1_v(\d+)\.json", p.name).group(1)): json.loads(p.read_text())
              for p in sorted(results.glob("table1_v*.json"))}
    rows = [row for vocab in sorted(tables) for row in model_rows(vocab, tables[vocab], results)]
    result = {"command": "python " + " ".join(sys.argv), "rows": rows,
              "tokenizers": [tokenizer_row(v, results) for v in sorted(tables)],
              "missing": [v for v in VOCABS if v not in tables], "verdict": verdict(rows)}
    write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result["verdict"], indent=1))


if __name__ == "__main__":
    main()
