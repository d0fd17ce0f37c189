#!/usr/bin/env bash
# Rebuild every shipped Fashion-MNIST artefact from scratch with the project's own commands.
# Each step is skipped when its output exists; delete an output to redo it. Times are for the
# 2-core CPU machine this project is developed on.
set -euo pipefail
cd "$(dirname "$0")/.."
CTFGEN=${CTFGEN:-.venv/bin/ctfgen}
PYTHON=${PYTHON:-.venv/bin/python}
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

# 5. The transformers: baseline (4096 fine tokens), CTF stage 1 (K = 128) and stage 2, all GPT-S, same
#    steps, batch and schedule. ~60 min for the three side by side on 2 cores (one thread each).
#    An interrupted run resumes from its last checkpoint (every 100 steps).
TRAIN=(--codes "$RUNS/codes/train" --eval-codes "$RUNS/codes/test" --model GPT-S --steps 1000 --batch-size 32
       --lr 5e-4 --warmup-steps 100 --dropout 0 --eval-every 500 --eval-items 1000 --ckpt-every 100
       --snapshot-every 100 --no-progress)
mkdir -p "$RUNS/fmnist"
for stage in baseline stage1 stage2; do
  run="$RUNS/fmnist/$stage"
  [ -f "$run/snapshots/step_0001000/model.safetensors" ] && continue
  map=(); [ "$stage" = baseline ] || map=(--map "$OUT/coarse_map_k128.safetensors")
  resume=(); [ -f "$run/checkpoint/train_state.pt" ] && resume=(--resume)
  OMP_NUM_THREADS=1 $CTFGEN train --stage "$stage" "${map[@]}" "${TRAIN[@]}" "${resume[@]}" --out "$run" \
    > "$RUNS/fmnist/$stage.log" 2>&1 &
done
wait

# 6. The shipped pipeline: tokenizer, map, stage 1, stage 2 and baseline (fp16).
$CTFGEN assemble --out "$OUT" --tokenizer "$OUT/tokenizer" --map "$OUT/coarse_map_k128.safetensors" \
  --stage1 "$RUNS/fmnist/stage1/snapshots/step_0001000" --stage2 "$RUNS/fmnist/stage2/snapshots/step_0001000" \
  --baseline "$RUNS/fmnist/baseline/snapshots/step_0001000" --class-names fmnist --dtype fp16
$PYTHON benchmarks/stage2_accuracy.py --refiner "$OUT/stage2" --map "$OUT/coarse_map_k128.safetensors" \
  --train-codes "$RUNS/codes/train" --test-codes "$RUNS/codes/test"

# 6b. The evaluation classifier (FID / IS / precision-recall features, trained on the training split;
#     ~17 min on one thread beside three trainings). Step 7 scores with it.
[ -f "$OUT/classifier/model.safetensors" ] || \
  OMP_NUM_THREADS=1 $CTFGEN eval train-classifier --out "$OUT/classifier" --channels 32,64,96 --pool-grid 4 \
    --epochs 8 --threads 1 --no-progress --json

# 7. The README's tables: 10,000 samples (1,000 per class) from each model, scored against the test split
#    with the shipped classifier's features, beside the real-data floor; then the speed benchmark.
mkdir -p "$RUNS/eval"
$CTFGEN eval --floor --json > "$RUNS/eval/floor.json"
for mode in ctf baseline; do
  flag=(); [ "$mode" = baseline ] && flag=(--baseline)
  $CTFGEN sample --pipeline "$OUT" --per-class 1000 --batch 250 --seed 0 "${flag[@]}" --npz "$RUNS/eval/$mode.npz"
  $CTFGEN eval --samples "$RUNS/eval/$mode.npz" --json > "$RUNS/eval/$mode.json"
done
$CTFGEN bench --pipeline "$OUT" --batch 64 --repeats 5 --json > "$RUNS/eval/bench.json"
$CTFGEN bench --pipeline "$OUT" --batch 64 --repeats 5 --compile --json > "$RUNS/eval/bench_compiled.json"
# Decoding against LlamaGen's own generate(), eager and compiled on both sides, given a checkout of
# FoundationVision/LlamaGen.
if [ -n "${LLAMAGEN_DIR:-}" ]; then
  $PYTHON benchmarks/llamagen_decode.py --llamagen "$LLAMAGEN_DIR" --batch 64 --repeats 5 --weights "$OUT/baseline" \
    --compile --compile-llamagen > "$RUNS/eval/llamagen.json"
fi

# 8. README figures: the demo grid and the (stage-1 preview | final) pairs.
$CTFGEN demo --out "$OUT/demo.png"
$CTFGEN sample --pipeline "$OUT" --classes 0,1,2,3,4,5,6,7,8,9 --seed 0 --preview-grid "$OUT/preview_vs_final.png"

# 9. Table 3 analogs: the number of clusters (k-means with K = 32 and 512) and random clustering at K = 128,
#    each a CTF pair (stage 1 and stage 2) trained 500 steps with the main schedule; 2,000 samples each.
#    The k-means K = 128 and baseline figures at step 500 come from step 10's curve. ~45 min for the six
#    trainings, four at a time, on 2 cores.
for variant in kmeans_k32 kmeans_k512 random_k128; do
  method=${variant%_k*}; k=${variant#*_k}
  map="$RUNS/fmnist/${method}_map_k$k.safetensors"
  [ -f "$map" ] || $CTFGEN cluster --tokenizer "$OUT/tokenizer" --k "$k" --method "$method" --seed 0 --out "$map"
  for stage in stage1 stage2; do
    run="$RUNS/fmnist/$variant/$stage"
    [ -f "$run/snapshots/step_0000500/model.safetensors" ] && continue
    resume=(); [ -f "$run/checkpoint/train_state.pt" ] && resume=(--resume)
    OMP_NUM_THREADS=1 $CTFGEN train --stage "$stage" --map "$map" "${TRAIN[@]}" --steps 500 --snapshot-every 500 \
      "${resume[@]}" --out "$run" > "$RUNS/fmnist/$variant.$stage.log" 2>&1 &
  done
done
wait
for variant in kmeans_k32 kmeans_k512 random_k128; do
  method=${variant%_k*}; k=${variant#*_k}; abl="$RUNS/fmnist/$variant"
  $CTFGEN assemble --out "$abl/pipeline" --tokenizer "$OUT/tokenizer" --map "$RUNS/fmnist/${method}_map_k$k.safetensors" \
    --stage1 "$abl/stage1/snapshots/step_0000500" --stage2 "$abl/stage2/snapshots/step_0000500" --dtype fp32
  $CTFGEN sample --pipeline "$abl/pipeline" --per-class 200 --batch 250 --seed 0 --npz "$RUNS/eval/$variant.npz"
  $CTFGEN eval --samples "$RUNS/eval/$variant.npz" --json > "$RUNS/eval/$variant.json"
done

# 10. Figure 2 analog: FID against training steps, CTF vs baseline, 2,000 samples per point.
$PYTHON scripts/fid_curve.py --runs "$RUNS/fmnist" --pipeline "$OUT" --per-class 200 --steps 500,700,1000 \
  --out "$OUT/fid_curve.png" > "$RUNS/eval/fid_curve.json"

# 11. Table 3's sampling sweeps on the shipped CTF pipeline, 2,000 samples per setting.
$PYTHON scripts/sampling_sweep.py --pipeline "$OUT" --per-class 200 \
  --settings "cfg_scale=1.5" "cfg_scale=3" "tau1=0.9" "tau2=0.5" "top_k2=3" > "$RUNS/eval/sweep.json"

# 12. Table 3's stage-2 size, and speed: a GPT-XS refiner (2 layers, a third of GPT-S) trained like the shipped
#     stage 2 (1,000 steps, ~8 min on 2 threads), swapped into the shipped pipeline; 10,000 samples and the bench.
XS="$RUNS/fmnist/stage2_xs"
[ -f "$XS/run/snapshots/step_0001000/model.safetensors" ] || \
  $CTFGEN train --stage stage2 --map "$OUT/coarse_map_k128.safetensors" "${TRAIN[@]}" --model GPT-XS --snapshot-every 500 \
    $( [ -f "$XS/run/checkpoint/train_state.pt" ] && echo --resume ) --out "$XS/run"
$CTFGEN assemble --out "$XS/pipeline" --tokenizer "$OUT/tokenizer" --map "$OUT/coarse_map_k128.safetensors" \
  --stage1 "$OUT/stage1" --stage2 "$XS/run/snapshots/step_0001000" --baseline "$OUT/baseline" --class-names fmnist --dtype fp16
$CTFGEN bench --pipeline "$XS/pipeline" --batch 64 --repeats 7 --json > "$RUNS/eval/bench_xs.json"
$CTFGEN sample --pipeline "$XS/pipeline" --per-class 1000 --batch 250 --seed 0 --npz "$RUNS/eval/ctf_xs.npz"
$CTFGEN eval --samples "$RUNS/eval/ctf_xs.npz" --json > "$RUNS/eval/ctf_xs.json"
