#!/usr/bin/env bash
# Retrain the shipped starter encoder from nothing: seeded procedural data, the starter run and the paper-only
# ablation (two processes side by side on one GPU), then the evaluation tables. Outputs under $WORK.
#
#   PYTHON=.venv/bin/python bash configs/train-starter.sh            # a CUDA machine: ~10 minutes on one H100
#   TRAIN_SECONDS=300 bash configs/train-starter.sh                  # stop each run after 300 s of training
#   CONFIG=configs/starter-levels.yaml STOP_AT_STEP=2000 STAGE2_STOP_AT_STEP=900 bash configs/train-starter.sh
#                                      # the next starter: earlier trunk levels in the image tokens, full schedules
#
# The shipped models/starter/encoder is stage 2 of this recipe. Both stages were cut short by the GPU session's
# time limit (max_seconds), and the defaults below reproduce where they stopped: stage 1 (the starter run) at
# step 1286 of its 2000-step schedule, stage 2 (a warm start from stage 1: seed 1, lr 2e-4, a new 900-step
# cosine schedule) at step 592. STOP_AT_STEP=2000 STAGE2_STOP_AT_STEP=900 finish both schedules.
# (On the GPU machine stage 2 started from a float16-rounded copy of the stage-1 weights, a transfer limit.)
#
# Seeds: training pairs 1 (cats are never red there), validation pairs 2, evaluation gallery 3, model init 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=${CONFIG:-configs/starter.yaml}
WORK=${WORK:-runs/starter}
PAIRS=${PAIRS:-16000}
VAL_PAIRS=${VAL_PAIRS:-300}
GALLERY=${GALLERY:-400}
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
LIMIT=()
if [ -n "${TRAIN_SECONDS:-}" ]; then LIMIT=(--set "max_seconds=$TRAIN_SECONDS"); fi
STOP_AT_STEP=${STOP_AT_STEP:-1286}
STAGE2_STOP_AT_STEP=${STAGE2_STOP_AT_STEP:-592}
HOLD_OUT=category=cat,color=red

stamp() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

stamp "data: $PAIRS training pairs (seed 1), 300 validation pairs (seed 2), 224 px, $WORKERS processes"
[ -f "$WORK/data-train/pairs.jsonl" ] || $PY -m training.data.procedural --out "$WORK/data-train" --pairs "$PAIRS" \
  --seed 1 --size 224 --hold-out "$HOLD_OUT" --workers "$WORKERS"
[ -f "$WORK/data-val/pairs.jsonl" ] || $PY -m training.data.procedural --out "$WORK/data-val" --pairs "$VAL_PAIRS" \
  --seed 2 --size 224 --workers "$WORKERS"

stamp "train: starter (L_con + factor loss) and paper-only (L_con) side by side"
$PY -m training.trainer --config "$CONFIG" --set "data_dir=$WORK/data-train" \
  --set "output_dir=$WORK/full" --stop-at-step "$STOP_AT_STEP" "${LIMIT[@]}" > "$WORK/full.log" 2>&1 &
full=$!
$PY -m training.trainer --config "$CONFIG" --set "data_dir=$WORK/data-train" \
  --set "output_dir=$WORK/paper-only" --set lambda_factor=0 "${LIMIT[@]}" > "$WORK/paper-only.log" 2>&1 &
paper=$!
status=0
wait $full || status=$?
wait $paper || status=$?
stamp "train: done (exit $status)"
tail -n 2 "$WORK/full/train_log.jsonl" "$WORK/paper-only/train_log.jsonl" || true

latest() { ls -d "$1"/checkpoint-* | sort | tail -n 1; }
FULL=$(latest "$WORK/full")
PAPER=$(latest "$WORK/paper-only")

stamp "train: stage 2, a warm start from $FULL"
$PY -m training.trainer --config "$CONFIG" --set "data_dir=$WORK/data-train" \
  --set "output_dir=$WORK/stage2" --set "init_encoder=$FULL/encoder" --set steps=900 --set lr=0.0002 \
  --set warmup_steps=20 --set seed=1 --set num_workers=12 --stop-at-step "$STAGE2_STOP_AT_STEP" "${LIMIT[@]}" \
  > "$WORK/stage2.log" 2>&1 || status=$?
STAGE2=$(latest "$WORK/stage2")

for paraphrase in 0 5; do
  stamp "eval: paraphrase $paraphrase"
  $PY -m training.evaluate --device "$DEVICE" --pairs "$WORK/data-val" --gallery-size "$GALLERY" --gallery-seed 3 \
    --image-size 224 --hold-out "$HOLD_OUT" --unseen-count $((GALLERY / 10)) --paraphrase "$paraphrase" \
    --untrained "untrained=$CONFIG" --model "starter (stage 2)=$STAGE2" --model "stage 1=$FULL" \
    --model "paper L_con only=$PAPER" --out "$WORK/eval-paraphrase-$paraphrase.md" > "$WORK/eval-$paraphrase.log" 2>&1 &
done
wait
stamp "done: the shipped model is $STAGE2/encoder"
cat "$WORK"/eval-paraphrase-*.md
exit $status
