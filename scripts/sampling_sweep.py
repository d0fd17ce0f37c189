"""Sampling settings against FID (the paper's Table 3 sweeps of tau1, tau2, CFG scale and stage-2 top-k).

    python scripts/sampling_sweep.py --pipeline pretrained/fmnist --per-class 200 \
        --settings "cfg_scale=1.5" "cfg_scale=3" "tau1=0.9" "tau2=0.5" "top_k2=3"

Each setting (comma-separated key=value pairs of CTFPipeline.__call__ arguments, on top of the defaults
CFG 2.0, tau1 = tau2 = 1, no top-k) is sampled `--per-class` images per class with the same seeds and
scored with `ctfgen eval`'s metrics against the test split. Prints one JSON line per setting, then all.
"""

from __future__ import annotations

import argparse
import json

from ctfgen.evaluation import evaluate_pipeline, load_feature_network
from ctfgen.pipeline import CTFPipeline

TYPES = {"cfg_scale": float, "tau1": float, "tau2": float, "top_k": int, "top_p": float, "top_k2": int,
         "cfg_scale2": float, "cfg_interval": int, "restrict": lambda v: v.lower() == "true", "mode": str}


def parse(setting: str) -> dict:
    pairs = dict(item.split("=", 1) for item in setting.split(",") if item)
    unknown = set(pairs) - set(TYPES)
    if unknown:
        raise SystemExit(f"sampling_sweep: error: unknown setting(s) {sorted(unknown)}; use {', '.join(TYPES)}")
    return {key: TYPES[key](value) for key, value in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--settings", nargs="+", default=[""], help='e.g. "cfg_scale=3" "tau2=0.5,top_k2=3"')
    args = parser.parse_args()
    pipe, network = CTFPipeline.from_pretrained(args.pipeline), load_feature_network("fmnist")
    rows = []
    for setting in args.settings:
        result = evaluate_pipeline(pipe, network, args.per_class, batch_size=args.batch, **parse(setting))
        row = {"setting": setting or "defaults",
               **{key: result[key] for key in ("fid", "inception_score", "precision", "recall", "accuracy")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
