#!/usr/bin/env bash
# The speed-quality frontier (README "Speed"): the models beside the shipped ones, then experiments/frontier.py.
# Needs the token grids of scripts/reproduce_fmnist.sh step 4 (runs/codes/{train,test}). Each training is
# skipped when its last snapshot exists and resumes when it was interrupted. Two jobs side by side with one
# thread each (the rule of the reproduce script): ~100 min on 2 CPU cores. FIDs are cached under
# runs/frontier/fid, so a second run only re-times.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=runs  # experiments/frontier_points.json names the parts under runs/frontier
MAP=pretrained/fmnist/coarse_map_k128.safetensors
TRAIN=(--codes "$RUNS/codes/train" --eval-codes "$RUNS/codes/test" --views 1 --steps 4690 --batch-size 64
       --lr 5e-4 --warmup-steps 100 --lr-schedule cosine --dropout 0 --eval-every 469 --eval-items 2000
       --ckpt-every 200 --snapshot-every 469 --compile --no-progress)
train() {  # NAME ARGS...: the shipped models' schedule, same data
  local out=$RUNS/frontier/$1; shift
  [ -f "$out/snapshots/step_0004690/model.safetensors" ] && return
  OMP_NUM_THREADS=1 $PYTHON -m ctfgen.cli train "$@" "${TRAIN[@]}" --out "$out" \
    $( [ -f "$out/checkpoint/train_state.pt" ] && echo --resume )
}
train stage2_s --stage stage2 --model GPT-S --map $MAP &                 # the full-size refiner for GPT-S
( train baseline_xs --stage baseline --model GPT-XS                      # the smaller baseline
  train stage1_xs --stage stage1 --model GPT-XS --map $MAP               # CTF's stage 1 at that size
  train stage2_tiny --stage stage2 --model GPT-tiny --map $MAP ) &       # the small refiner for GPT-XS
wait
# On a quiet machine (the timing is interleaved, but other jobs still slow it): FIDs of 10,000 samples, speed.
$PYTHON experiments/frontier.py --points experiments/frontier_points.json --cache "$RUNS/frontier/fid" \
  --json docs/results/frontier.json --plot docs/frontier.png
