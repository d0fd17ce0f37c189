#!/usr/bin/env bash
# Issue 21, part 2: refiners that read revealed fine tokens (--reveal), trained like the shipped stage 2 (GPT-XS,
# 5 epochs of the 60,000 training images without mirrors, batch 64, lr 5e-4 cosine), at K = 128 (the shipped map)
# and K = 512 (k-means, seed 0). One job at a time, one thread (the machine is shared). Resumable: rerun it.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
[ -d runs/codes/train ] || $CTFGEN extract --data fmnist --split train --out runs/codes/train
[ -d runs/codes/test ] || $CTFGEN extract --data fmnist --split test --out runs/codes/test
MAP512=runs/maps/coarse_map_k512.safetensors
[ -f "$MAP512" ] || $CTFGEN cluster --k 512 --seed 0 --out "$MAP512"
source scripts/shipped_schedule.sh
for k in 128 512; do  # one at a time (the machine is shared)
  shipped_train runs/reveal/k$k stage2 GPT-XS runs/codes --reveal \
    --map "$([ $k = 128 ] && echo pretrained/fmnist/coarse_map_k128.safetensors || echo "$MAP512")"
done
