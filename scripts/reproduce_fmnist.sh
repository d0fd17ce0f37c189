#!/usr/bin/env bash
# Rebuild every shipped Fashion-MNIST artefact from scratch with the project's own commands.
# Each step is skipped when its output exists; delete an output to redo it. Times are for the
# 2-core CPU machine this project is developed on.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
OUT=pretrained/fmnist
RUNS=${RUNS:-runs}

# 1. The tokenizer (VQ-fmnist, 0.88M parameters; ~45 min in fp32 on 2 CPU cores).
if [ ! -f "$OUT/tokenizer/model.safetensors" ]; then
  $CTFGEN tokenizer train --out "$RUNS/vq_fmnist" --model VQ-fmnist --steps 2400 --batch-size 64 --lr 1e-3 \
    --ckpt-every 200 $( [ -f "$RUNS/vq_fmnist/checkpoint/train_state.pt" ] && echo --resume )
  $CTFGEN export "$RUNS/vq_fmnist/checkpoint" "$OUT/tokenizer" --dtype fp16
fi
$CTFGEN tokenizer eval --tokenizer "$OUT/tokenizer" --split test --json

# 2. Coarse labels: k-means with K = 128 over the 4096 codewords (seconds).
[ -f "$OUT/coarse_map_k128.safetensors" ] || \
  $CTFGEN cluster --tokenizer "$OUT/tokenizer" --k 128 --seed 0 --out "$OUT/coarse_map_k128.safetensors"

# 3. The redundancy study (paper Fig. 1b) on 1000 test images.
$CTFGEN redundancy --tokenizer "$OUT/tokenizer" --map "$OUT/coarse_map_k128.safetensors" --n 1000 \
  --out "$RUNS/redundancy" --json
cp "$RUNS/redundancy/redundancy.png" "$OUT/redundancy_k128.png"

# 4. Token grids for the transformers (train with flips, test without).
[ -f "$RUNS/codes/train/manifest.json" ] || \
  $CTFGEN extract --tokenizer "$OUT/tokenizer" --data fmnist --split train --flip --out "$RUNS/codes/train"
[ -f "$RUNS/codes/test/manifest.json" ] || \
  $CTFGEN extract --tokenizer "$OUT/tokenizer" --data fmnist --split test --out "$RUNS/codes/test"
