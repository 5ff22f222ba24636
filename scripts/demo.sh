#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job end to end on Fashion-MNIST:
# prepare webdataset shards, train a KL-f4 first stage, evaluate it, train a class-conditional
# latent diffusion model on its latents, and sample a class-conditional grid.
# Budgets in training steps (so the result does not depend on how busy the machine is):
# LDMKIT_DEMO_AE_STEPS (default 1500, ~3 minutes on 2 cores), LDMKIT_DEMO_LDM_STEPS (1000, ~5 minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
LDMKIT="$ROOT/.venv/bin/ldmkit"
OUT="${LDMKIT_DEMO_DIR:-$ROOT/runs/demo}"
AE_STEPS="${LDMKIT_DEMO_AE_STEPS:-1500}"
LDM_STEPS="${LDMKIT_DEMO_LDM_STEPS:-1000}"
DATA="${LDMKIT_DEMO_DATA:-$ROOT/data/fashion_mnist}"
mkdir -p "$OUT"

"$LDMKIT" plugins
if [ ! -f "$DATA/manifest.json" ]; then
    "$LDMKIT" data prepare fashion_mnist out="$DATA"
fi

echo "== stage 1: KL-f4 autoencoder, $AE_STEPS training steps"
"$LDMKIT" train experiment=fmnist_kl_f4 data.path="$DATA" run_dir="$OUT/kl_f4" \
    trainer.max_minutes=null trainer.max_steps="$AE_STEPS" trainer.val_every=500
"$LDMKIT" evaluate experiment=fmnist_kl_f4 data.path="$DATA" run_dir="$OUT/kl_f4" \
    eval.max_images=2000 eval.fid_features=none

echo "== stage 2: class-conditional LDM on its latents, $LDM_STEPS training steps"
"$LDMKIT" train experiment=fmnist_ldm_kl_f4 data.path="$DATA" run_dir="$OUT/ldm" \
    first_stage.checkpoint="$OUT/kl_f4" trainer.max_minutes=null trainer.max_steps="$LDM_STEPS"

echo "== sampling: one row per class (DDIM, 50 steps, guidance 3)"
LABELS="$(python3 -c 'print(",".join(str(c) for c in range(10) for _ in range(8)))')"
"$LDMKIT" sample --checkpoint "$OUT/ldm/pipeline" --labels "$LABELS" --guidance-scale 3 \
    sampler.steps=50 --out "$OUT/samples.png"
echo "demo finished: reconstructions in $OUT/kl_f4/images, samples in $OUT/samples.png"
