#!/usr/bin/env bash
# Issue 21, part 2: refiners that read revealed fine tokens (--reveal), trained like the shipped stage 2 (GPT-XS,
# 5 epochs of the 60,000 training images without mirrors, batch 64, lr 5e-4 cosine), at K = 128 (the shipped map)
# and K = 512 (k-means, seed 0). One job at a time, one thread (the machine is shared). Resumable: rerun it.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=.venv/bin/ctfgen
[ -d runs/codes/train ] || $CTFGEN extract --data fmnist --split train --out runs/codes/train
[ -d runs/codes/test ] || $CTFGEN extract --data fmnist --split test --out runs/codes/test
MAP512=runs/maps/coarse_map_k512.safetensors
[ -f "$MAP512" ] || $CTFGEN cluster --k 512 --seed 0 --out "$MAP512"
TRAIN="--codes runs/codes/train --eval-codes runs/codes/test --views 1 --steps 4690 --batch-size 64 --lr 5e-4 \
  --warmup-steps 100 --lr-schedule cosine --dropout 0 --eval-every 469 --eval-items 2000 --ckpt-every 200 --compile \
  --no-progress"
for k in 128 512; do
  map=$([ $k = 128 ] && echo pretrained/fmnist/coarse_map_k128.safetensors || echo "$MAP512")
  out=runs/reveal/k$k
  resume=$([ -f "$out/train_config.json" ] && echo --resume || true)
  OMP_NUM_THREADS=1 $CTFGEN train --stage stage2 --reveal --model GPT-XS --map "$map" $TRAIN --out "$out" $resume
done
