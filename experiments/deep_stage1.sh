#!/usr/bin/env bash
# Issue 21, part 3: stage 1 paid with the head's savings. At K = 512 stage 1's head has 512 x 256 weights where the
# baseline's has 4096 x 256; with 7 blocks instead of GPT-S's 6, a stage-1 decode step does 0.99x the baseline's
# matmul work per token, with 11 blocks 1.54x (table1.py reports the ratio). Both are trained like the shipped
# stage 1 (5 epochs, batch 64, lr 5e-4 cosine), side by side with one thread each; stage 2 is the K = 512 refiner of
# experiments/stage2_steps.sh, sampled in one pass. Resumable: rerun it. Then the coarse NLL and the FID draws.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
PYTHON=${PYTHON:-.venv/bin/python}
MAP512=runs/maps/coarse_map_k512.safetensors
REFINER=runs/reveal/k512/checkpoint
[ -f "$REFINER/model.safetensors" ] || experiments/stage2_steps.sh
source scripts/shipped_schedule.sh
pids=()
for layers in 7 11; do  # side by side, one thread each
  shipped_train runs/deep/stage1_k512_L$layers stage1 GPT-S runs/codes --n-layer $layers --map "$MAP512" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed training stops the script here (set -e)
for layers in 7 11; do
  pipe=runs/deep/pipe_k512_l$layers
  [ -d "$pipe" ] || $CTFGEN assemble --out "$pipe" --tokenizer pretrained/fmnist/tokenizer --map "$MAP512" \
    --stage1 runs/deep/stage1_k512_L$layers/snapshots/step_0004690 --stage2 "$REFINER" \
    --baseline pretrained/fmnist/baseline --class-names fmnist --dtype fp16
  $PYTHON experiments/coarse_nll.py --pipeline "$pipe" --codes runs/codes/test --n 2000 \
    > docs/results/coarse_nll_k512_l$layers.json
done
$PYTHON experiments/table1.py --pipeline pretrained/fmnist --ctf ctf_k512_l7=runs/deep/pipe_k512_l7 \
  --ctf ctf_k512_l11=runs/deep/pipe_k512_l11 --out docs/results/table1_convergence.json
