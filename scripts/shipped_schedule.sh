# The training schedule of the shipped transformers, sourced (not run) by scripts/reproduce_fmnist.sh and by the
# experiments that train their models alike: 5 epochs of the 60,000 Fashion-MNIST training images (4,690 steps of
# batch 64, no mirrors), lr 5e-4 after 100 warm-up steps with cosine decay, no dropout, the held-out loss every 469
# steps on 2,000 grids, a checkpoint every 200 steps and a snapshot of the weights every 469, the training step
# compiled, one torch thread (two runs share the two cores). `ctfgen fit --preset small` has the same numbers.
#
#   shipped_train OUT STAGE MODEL CODES [more `ctfgen train` flags]
#
# trains into OUT (its log in OUT.log) on CODES/train, held out CODES/test; it returns at once when the last
# snapshot is there and resumes an interrupted run from its checkpoint. Needs $CTFGEN.
shipped_train() {
  local out=$1 stage=$2 model=$3 codes=$4 resume=()
  [ -f "$out/snapshots/step_0004690/model.safetensors" ] && return
  [ -f "$out/checkpoint/train_state.pt" ] && resume=(--resume)
  mkdir -p "$(dirname "$out")"
  OMP_NUM_THREADS=1 $CTFGEN train --stage "$stage" --model "$model" "${@:5}" --codes "$codes/train" \
    --eval-codes "$codes/test" --views 1 --steps 4690 --batch-size 64 --lr 5e-4 --warmup-steps 100 \
    --lr-schedule cosine --dropout 0 --eval-every 469 --eval-items 2000 --ckpt-every 200 --snapshot-every 469 \
    --compile --no-progress "${resume[@]}" --out "$out" > "$out.log" 2>&1
}
