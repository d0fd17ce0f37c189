#!/usr/bin/env bash
# Issue 21, part 1: the vocabulary sweep on Fashion-MNIST. For each codebook size V: a tokenizer with V codewords
# (VQ-fmnist's recipe: 3,600 fp32 steps), CTF with K = V/32 (the paper's ratio) and K = V/8, and the baseline, each
# trained to convergence on the shipped schedule (`ctfgen fit --preset small`); then three draws of 10,000 samples
# per model, the tokenizer's PSNR, usage and rFID, and the coarse-label NLL; finally docs/vocab_sweep.json and its plot.
# V = 4096 with K = 128 is the shipped pipeline (the same recipe), so V = 4096 needs only its K = 512 pair.
#
# Every step resumes: `ctfgen fit` skips what is done and continues a training from its last checkpoint, and
# table1.py reuses the draws already scored, so run this again after an interruption. VOCABS="1024" runs one V.
# Compute on a 2-core AVX-512 CPU: per new V a tokenizer (~80 min), its codes (~15 min), three GPT-S and two
# GPT-XS trainings (~2 h 10 min), nine draws (~45 min): about 4.5 h; V = 4096 about 1.5 h.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/sweep}
DOCS=docs/results/vocab_sweep
mkdir -p "$RUNS" "$DOCS"

for V in ${VOCABS:-4096 1024 16384}; do
  K1=$((V / 32)) K2=$((V / 8))
  if [ "$V" = 4096 ]; then
    MAIN=pretrained/fmnist CODES=runs/codes/test  # scripts/reproduce_fmnist.sh step 4
  else
    printf 'codebook_size = %d\n' "$V" > "$RUNS/v$V.toml"  # K = V/32 follows from the preset's rule
    $CTFGEN fit --data fmnist --preset small --config "$RUNS/v$V.toml" --out "$RUNS/v${V}_k$K1"
    MAIN=$RUNS/v${V}_k$K1/pipeline CODES=$RUNS/v${V}_k$K1/codes/val
  fi
  $CTFGEN fit --data fmnist --preset small --tokenizer "$MAIN/tokenizer" --k "$K2" --no-baseline \
    --out "$RUNS/v${V}_k$K2"
  $PYTHON experiments/table1.py --pipeline "$MAIN" --ctf "ctf_k$K2=$RUNS/v${V}_k$K2/pipeline" \
    --runs "$RUNS/eval/v$V" --out "$DOCS/table1_v$V.json"
  $CTFGEN tokenizer eval --tokenizer "$MAIN/tokenizer" --split test --json > "$DOCS/tokenizer_v$V.json"
  $CTFGEN eval --reconstruction "$MAIN/tokenizer" --json > "$DOCS/reconstruction_v$V.json"
  $PYTHON experiments/coarse_nll.py --pipeline "$MAIN" --codes "$CODES" --n 2000 > "$DOCS/coarse_nll_v${V}_k$K1.json"
  $PYTHON experiments/coarse_nll.py --pipeline "$RUNS/v${V}_k$K2/pipeline" --baseline "$MAIN/baseline" \
    --codes "$CODES" --n 2000 > "$DOCS/coarse_nll_v${V}_k$K2.json"
done
$PYTHON experiments/vocab_sweep.py --results "$DOCS" --out docs/vocab_sweep.json --plot docs/vocab_sweep.png
