"""Sampling settings against FID (the paper's Table 3 sweeps of the stage-1 and stage-2 temperatures, CFG
scale and stage-2 top-k).

    python experiments/sampling_sweep.py --pipeline pretrained/fmnist --per-class 200 --dtype bf16 \
        --settings "" "cfg_scale=1.5" "cfg_scale=3" "temperature=0.9" "stage2_temperature=0.5" "stage2_top_k=3" \
                   "mode=baseline" "mode=baseline,cfg_scale=3" "mode=baseline,temperature=0.9"

Each setting (comma-separated key=value pairs: a SamplingParams field for stage 1, the same prefixed with
`stage2_` for stage 2, `restrict` or `mode`; on top of the pipeline's defaults, CFG 2.0 in stage 1, both
temperatures 1, no top-k) is sampled `--per-class` images per class with the same seed and scored with
`ctfgen eval`'s metrics against the test split. Prints one JSON line per setting as it is scored; with --out,
writes them all (and the command) to one JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from ctfgen.checkpoint import DTYPES
from ctfgen.evaluation import evaluate_pipeline, load_feature_network
from ctfgen.files import write_atomic
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import STAGE1_DEFAULTS, STAGE2_DEFAULTS

STAGES = {"": ("sampling", STAGE1_DEFAULTS), "stage2_": ("stage2_sampling", STAGE2_DEFAULTS)}
KEYS = {prefix + f.name: (prefix, f.name) for prefix in STAGES for f in dataclasses.fields(STAGE1_DEFAULTS)}
OTHER = {"restrict": lambda v: v.lower() == "true", "mode": str}


def parse(setting: str) -> dict:
    """ "temperature=0.9,stage2_top_k=3" -> the pipeline call's sampling, stage2_sampling (and restrict, mode)."""
    pairs = dict(item.split("=", 1) for item in setting.split(",") if item)
    unknown = set(pairs) - set(KEYS) - set(OTHER)
    if unknown:
        raise SystemExit(f"sampling_sweep: error: unknown setting(s) {sorted(unknown)}; "
                         f"use {', '.join([*KEYS, *OTHER])}")
    request = {key: OTHER[key](value) for key, value in pairs.items() if key in OTHER}
    for prefix, (argument, defaults) in STAGES.items():
        changes = {name: type(getattr(defaults, name))(pairs[key]) for key, (p, name) in KEYS.items()
                   if p == prefix and key in pairs}
        request[argument] = dataclasses.replace(defaults, **changes)
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the transformers' weights")
    parser.add_argument("--settings", nargs="+", default=[""],
                        help='e.g. "cfg_scale=3" "stage2_temperature=0.5,stage2_top_k=3"')
    parser.add_argument("--out", help="write every setting's row here (JSON)")
    args = parser.parse_args()
    requests = [parse(setting) for setting in args.settings]  # every setting checked before the first is sampled
    pipe = CTFPipeline.from_pretrained(args.pipeline).copy(DTYPES[args.dtype])
    network = load_feature_network("fmnist")
    rows = []
    for setting, request in zip(args.settings, requests):
        result = evaluate_pipeline(pipe, network, args.per_class, batch_size=args.batch, **request)
        row = {"setting": setting or "defaults",
               **{key: result[key] for key in ("n_samples", "fid", "inception_score", "precision", "recall",
                                               "accuracy")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        result = {"command": "python " + shlex.join(sys.argv), "pipeline": args.pipeline, "dtype": args.dtype,
                  "rows": rows}
        write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))


if __name__ == "__main__":
    main()
