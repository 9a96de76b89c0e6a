#!/usr/bin/env bash
# Train the real-photo starter (configs/starter-real.yaml: the floor, the feature cache) on this machine's CPU,
# at most ~2 h per call (max_seconds), seeds fixed. A second call continues from the last checkpoint.
#
#   DATA=runs/real/data-train bash configs/train-starter-real.sh
#   PYTHON=.venv/bin/python STEPS=200 bash configs/train-starter-real.sh      # a shorter schedule
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=${CONFIG:-configs/starter-real.yaml}
DATA=${DATA:-runs/real/data-train}
OUT=${OUT:-runs/real/starter}
CACHE=${CACHE:-runs/real/feature-cache}
SET=(--set "data_dir=$DATA" --set "output_dir=$OUT" --set "feature_cache=$CACHE")
if [ -n "${STEPS:-}" ]; then SET+=(--set "steps=$STEPS"); fi
if [ -n "${TRAIN_SECONDS:-}" ]; then SET+=(--set "max_seconds=$TRAIN_SECONDS"); fi
RESUME=()
if ls -d "$OUT"/checkpoint-* > /dev/null 2>&1; then RESUME=(--resume); fi
printf '[%s] feature cache for %s\n' "$(date +%T)" "$DATA"
$PY -m training.feature_cache build --config "$CONFIG" --data "$DATA" --cache "$CACHE"
printf '[%s] train %s -> %s %s\n' "$(date +%T)" "$CONFIG" "$OUT" "${RESUME[*]}"
$PY -m training.trainer --config "$CONFIG" "${SET[@]}" "${RESUME[@]}"
