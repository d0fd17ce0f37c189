#!/usr/bin/env bash
# Issue 21, part 1: the vocabulary sweep on Fashion-MNIST. For each codebook size V: a tokenizer with V codewords
# (VQ-fmnist's recipe: 3,600 fp32 steps), CTF with K = V/32 (the paper's ratio) and K = V/8, and the baseline, each
# trained to convergence on the shipped schedule (`ctfgen fit --preset small`); then three draws of 10,000 samples
# per model, the tokenizer's PSNR, usage and rFID, and the coarse-label NLL; finally docs/vocab_sweep.json and its plot.
# V = 4096 with K = 128 is the shipped pipeline (the same recipe), so V = 4096 needs only its K = 512 pair. V = 4096
# has a second training of the same recipe too, issue 22's fit of Fashion-MNIST as a folder (docs/fit.md, in
# runs/fit_fmnist_png): its baseline and K = 128 are measured the same way, as training 2 ("_t2"), when it is there.
#
# Every step resumes: `ctfgen fit` skips what is done and continues a training from its last checkpoint, and
# table1.py reuses the draws already scored, so run this again after an interruption. VOCABS="1024" runs one V.
# Compute on a 2-core AVX-512 CPU, one thread per V: V = 1,024 about 6 h (a tokenizer ~55 min, three GPT-S trainings
# ~75 min each, two GPT-XS ~25 min each, nine draws ~45 min); V = 16,384 about twice that, its 16,384-way heads making
# stage 2 (~1 h 50 min) and the baseline (~2 h 50 min) two and a half times slower. The baseline and K = V/32 are
# measured before K = V/8 is trained, and docs/vocab_sweep.json is rewritten after each measurement.
# Edit this file by replacing it (write a copy, then mv): bash reads a running script as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/sweep}
DOCS=docs/results/vocab_sweep
mkdir -p "$RUNS" "$DOCS"

# into FILE COMMAND...: COMMAND's output as FILE, which is replaced only when COMMAND succeeds
into() {
  local file=$1; shift
  "$@" > "$file.tmp" || { rm -f "$file.tmp"; return 1; }
  mv "$file.tmp" "$file"
}

# measure_pair NAME MAIN CODES K: three draws each of MAIN's baseline and CTF (K coarse labels), MAIN's tokenizer and
# its CTF's coarse-label NLL; the files are named after NAME. Then the sweep's JSON and plot, so far.
measure_pair() {
  local name=$1 main=$2 codes=$3 k=$4
  $PYTHON experiments/table1.py --pipeline "$main" --runs "$RUNS/eval/$name" --out "$DOCS/table1_$name.json"
  into "$DOCS/tokenizer_$name.json" $CTFGEN tokenizer eval --tokenizer "$main/tokenizer" --split test --json
  into "$DOCS/reconstruction_$name.json" $CTFGEN eval --reconstruction "$main/tokenizer" --json
  into "$DOCS/coarse_nll_${name}_k$k.json" $PYTHON experiments/coarse_nll.py --pipeline "$main" --codes "$codes" \
    --n 2000
  summarise
}

# measure_ctf NAME MAIN CODES K OTHER: OTHER's CTF (K coarse labels, MAIN's tokenizer) joins NAME's table (MAIN's
# draws are reused) with its coarse-label NLL against MAIN's baseline.
measure_ctf() {
  local name=$1 main=$2 codes=$3 k=$4 other=$5
  $PYTHON experiments/table1.py --pipeline "$main" --ctf "ctf_k$k=$other" --runs "$RUNS/eval/$name" \
    --out "$DOCS/table1_$name.json"
  into "$DOCS/coarse_nll_${name}_k$k.json" $PYTHON experiments/coarse_nll.py --pipeline "$other" \
    --baseline "$main/baseline" --codes "$codes" --n 2000
  summarise
}

summarise() {
  $PYTHON experiments/vocab_sweep.py --results "$DOCS" --out docs/vocab_sweep.json --plot docs/vocab_sweep.png
}

for V in ${VOCABS:-4096 1024 16384}; do
  K1=$((V / 32)) K2=$((V / 8))
  if [ "$V" = 4096 ]; then
    MAIN=pretrained/fmnist CODES=runs/codes/test  # scripts/reproduce_fmnist.sh step 4
  else
    printf 'codebook_size = %d\n' "$V" > "$RUNS/v$V.toml"  # K = V/32 follows from the preset's rule
    $CTFGEN fit --data fmnist --preset small --config "$RUNS/v$V.toml" --out "$RUNS/v${V}_k$K1"
    MAIN=$RUNS/v${V}_k$K1/pipeline CODES=$RUNS/v${V}_k$K1/codes/val
  fi
  measure_pair "v$V" "$MAIN" "$CODES" "$K1"
  # K = V/8 reuses K = V/32's tokenizer: the pipeline's copy, or at V = 16,384 the trained checkpoint itself (the
  # same weights in fp32, the ones that made the baseline's token grids), so that K = 2,048 could start while the
  # baseline still trained
  TOKENIZER=$MAIN/tokenizer
  [ "$V" = 16384 ] && TOKENIZER=$RUNS/v${V}_k$K1/runs/tokenizer/checkpoint
  $CTFGEN fit --data fmnist --preset small --tokenizer "$TOKENIZER" --k "$K2" --no-baseline --out "$RUNS/v${V}_k$K2"
  measure_ctf "v$V" "$MAIN" "$CODES" "$K2" "$RUNS/v${V}_k$K2/pipeline"
  if [ "$V" = 4096 ] && [ -d runs/fit_fmnist_png/pipeline ]; then
    measure_pair v4096_t2 runs/fit_fmnist_png/pipeline runs/fit_fmnist_png/codes/val 128
  fi
done
