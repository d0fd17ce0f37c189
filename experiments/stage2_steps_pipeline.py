"""The whole CTF pipeline with stage 2 in S passes: FID of 10,000 samples per S, drawn as Table 1's are.

    python experiments/stage2_steps_pipeline.py --pipeline runs/reveal/pipe_k128 --steps 1,2 --seeds 0 \
        --out docs/results/stage2_steps_pipeline_k128.json

The pipeline's stage 2 must read fine tokens for S > 1 (trained with `ctfgen train --stage stage2 --reveal`; see
experiments/stage2_steps.sh). Each draw is `ctfgen sample ... --stage2-steps S` and `ctfgen eval` (reused when its
report is already in --runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from table1 import row

from ctfgen.files import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--steps", default="1,2,4,8", help="stage-2 passes, comma-separated")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--runs", default="runs/reveal/eval", help="where the sample files and their reports go")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for steps in (int(s) for s in args.steps.split(",")):
        drawn = row(args.pipeline, f"ctf_s{steps}", seeds, ["--stage2-steps", str(steps)], runs)
        rows.append({"stage2_steps": steps, "draws": drawn["draws"], "mean": drawn["mean"]})
    result = {"command": "python " + " ".join(sys.argv), "pipeline": args.pipeline, "n_samples": 10000,
              "dtype": "bf16", "rows": rows, "written": time.strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(result, indent=1)
    write_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
