#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job end to end on Fashion-MNIST:
# prepare webdataset shards, train a KL-f4 first stage, evaluate it, train a class-conditional
# latent diffusion model on its latents, and sample a class-conditional grid.
# Budgets (training minutes): LDMKIT_DEMO_AE_MINUTES (default 3), LDMKIT_DEMO_LDM_MINUTES (5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
LDMKIT="$ROOT/.venv/bin/ldmkit"
OUT="${LDMKIT_DEMO_DIR:-$ROOT/runs/demo}"
AE_MINUTES="${LDMKIT_DEMO_AE_MINUTES:-3}"
LDM_MINUTES="${LDMKIT_DEMO_LDM_MINUTES:-5}"
DATA="${LDMKIT_DEMO_DATA:-$ROOT/data/fashion_mnist}"
mkdir -p "$OUT"

"$LDMKIT" plugins
if [ ! -f "$DATA/manifest.json" ]; then
    "$LDMKIT" data prepare fashion_mnist out="$DATA"
fi

echo "== stage 1: KL-f4 autoencoder, $AE_MINUTES training minutes"
"$LDMKIT" train experiment=fmnist_kl_f4 data.path="$DATA" run_dir="$OUT/kl_f4" \
    trainer.max_minutes="$AE_MINUTES" trainer.val_every=200
"$LDMKIT" evaluate experiment=fmnist_kl_f4 data.path="$DATA" run_dir="$OUT/kl_f4" \
    eval.max_images=2000 eval.fid_features=none

echo "== stage 2: class-conditional LDM on its latents, $LDM_MINUTES training minutes"
"$LDMKIT" train experiment=fmnist_ldm_kl_f4 data.path="$DATA" run_dir="$OUT/ldm" \
    first_stage.checkpoint="$OUT/kl_f4" trainer.max_minutes="$LDM_MINUTES"

echo "== sampling: one row per class (DDIM, 50 steps, guidance 3)"
LABELS="$(python3 -c 'print(",".join(str(c) for c in range(10) for _ in range(8)))')"
"$LDMKIT" sample --checkpoint "$OUT/ldm/pipeline" --labels "$LABELS" --guidance-scale 3 \
    sampler.steps=50 --out "$OUT/samples.png"
echo "demo finished: reconstructions in $OUT/kl_f4/images, samples in $OUT/samples.png"
