#!/usr/bin/env bash
# Train a 128 px starter generator on this CPU from the real-content pairs, then its transfer adapter.
#
#   PYTHON=.venv/bin/python DATA=runs/real/data-train bash configs/train-starter-generator-real.sh
#
# DATA: the realpairs corpus of configs/train-starter-real.sh (TRAIN sources only, 224 px, with --bases).
# Rerunning the same command resumes: WORK keeps the resized images, the VAE latents, the adapter's precomputed
# encoder tokens / latents / caption features and each stage's checkpoint (time budgets count the time spent).
# 1. base: AutoencoderKL (channels 8 16 32 64, one GroupNorm group: 128 x 128 RGB -> 16 x 16 x 8 latents, 64 packed
#    tokens) for VAE_SECONDS, then a FluxTransformer2DModel (3 double + 3 single blocks, 4 heads x 32) for
#    TRANSFORMER_SECONDS on both sides of the first 4000 pairs; seed 0.
# 2. adapter: models/starter/encoder's tokens plus its pooled search vector (frozen) -> the attribute adapter,
#    on the "transfer" pairs only: pairs sharing lighting, palette or art style whose subjects differ. Reference =
#    one side encoded under the shared attributes, target = the other side under its own caption (dropped in 80 %
#    of the steps: the page's prompt is often empty). 80 % of the steps on pairs with a base train
#    apply-to-my-image: they start from the target's base image (the same content with the shared attribute
#    changed, realpairs --bases) noised to a sigma in 0.5-0.95 and end at the target (losses.bridge_inputs).
#    --weight-gain 3: a reference of weight 1 steers with 3 (chosen on bench/transfer_score.py --seed 1 cases).
# Then measure with bench/transfer_score.py --real ... --base (the commands are in bench/RESULTS.md).
# --threads 1 and nice: the machine has two cores shared with other jobs.
# Status (CPU, 2026-12-01, fourth session): this recipe made models/starter/generator (base 50 min on one thread;
# adapter 30 min: 15 on one thread, then resumed for 15 on two, 6907 steps; one thread throughout gives fewer).
# VAE chroma_left 0.10 on held-out photos (bench/vae_colour.py); apply-to-my-image transfer on held-out real images
# in bench/RESULTS.md ("The shipped starter generator").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=${DATA:-runs/real/data-train}
WORK=${WORK:-runs/gen-real}
GEN=${GEN:-$WORK/generator}
VAE_SECONDS=${VAE_SECONDS:-1800}  # colour arrives after ~1500 VAE steps (1.8-3.7 steps/s on one thread)
TRANSFORMER_SECONDS=${TRANSFORMER_SECONDS:-1080}
ADAPTER_SECONDS=${ADAPTER_SECONDS:-1800}
RUN="nice -n 19 $PY"

stamp() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

stamp "base: 128 px, VAE ${VAE_SECONDS}s, transformer ${TRANSFORMER_SECONDS}s, seed 0"
$RUN -m training.generator_pretrain base --data "$DATA" --out "$GEN" --size 128 --seed 0 --max-pairs 4000 \
  --vae-channels 8 16 32 64 --vae-norm-groups 1 --vae-batch-size 8 --vae-seconds "$VAE_SECONDS" \
  --transformer-seconds "$TRANSFORMER_SECONDS" --work "$WORK/base-work" --threads 1 | tee -a "$WORK/base.log"

stamp "adapter: ${ADAPTER_SECONDS}s, seed 0, encoder frozen, transfer pairs (lighting, palette, style)"
$RUN -m training.generator_pretrain adapter --data "$DATA" --generator "$GEN" --encoder models/starter/encoder \
  --attributes lighting palette style --max-pairs 1500 --seed 0 --seconds "$ADAPTER_SECONDS" \
  --bridge-share 0.8 --text-dropout 0.8 --weight-gain 3 --work "$WORK/adapter-work" --threads 1 \
  | tee -a "$WORK/adapter.log"
stamp "done"
